"""Reading GET /metrics in tests: samples by name and labels, and the change between two scrapes."""
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import API_KEYS


def parse(text):
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def scrape(client, key=API_KEYS[0]):
    response = client.get("/metrics", headers={"X-API-Key": key})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "text/plain"
    return parse(response.get_data(as_text=True))


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before, after, name, **labels):
    return value(after, name, **labels) - value(before, name, **labels)
