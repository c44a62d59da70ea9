"""GET /metrics is a view of the Prometheus series serve_app.telemetry records: parsed and summed here,
without Ray, from text in the format Ray's metrics endpoint writes."""

from serve_app.ingress.metrics import parse_samples, summarize

TAGS = 'application="{app}",deployment="{deployment}",replica="{replica}"'


def series(name, value, app="grounded-serve", deployment="Detector", replica="r1", **labels):
    tags = TAGS.format(app=app, deployment=deployment, replica=replica)
    extra = "".join(f',{k}="{v}"' for k, v in labels.items())
    return f"{name}{{{tags}{extra}}} {value}"


def histogram(name, buckets, deployment="Detector", replica="r1", app="grounded-serve"):
    lines = [f"# TYPE {name} histogram"]
    for le, count in buckets:
        lines.append(series(f"{name}_bucket", count, app, deployment, replica, le=le))
    lines.append(series(f"{name}_count", buckets[-1][1], app, deployment, replica))
    lines.append(series(f"{name}_sum", 0, app, deployment, replica))
    return lines


def test_batch_sizes_cache_and_counters_are_summed_over_replicas():
    text = "\n".join([
        *histogram("ray_grounded_serve_batch_size", [("1.0", 2), ("2.0", 2), ("3.0", 5), ("+Inf", 5)]),
        *histogram("ray_grounded_serve_batch_size", [("1.0", 1), ("2.0", 1), ("3.0", 1), ("+Inf", 1)],
                   replica="r2"),
        *histogram("ray_grounded_serve_batch_size", [("1.0", 0), ("8.0", 4), ("+Inf", 4)], deployment="Segmenter"),
        *histogram("ray_grounded_serve_batch_size", [("1.0", 9), ("+Inf", 9)], app="another-app"),
        "# TYPE ray_grounded_serve_embedding_cache_lookups_total counter",
        series("ray_grounded_serve_embedding_cache_lookups_total", 3, deployment="Segmenter", result="hit"),
        series("ray_grounded_serve_embedding_cache_lookups_total", 4, deployment="Segmenter", result="miss"),
        "# TYPE ray_grounded_serve_images_encoded_total counter",
        series("ray_grounded_serve_images_encoded_total", 4, deployment="Segmenter"),
        "# TYPE ray_grounded_serve_embedding_cache_bytes gauge",
        series("ray_grounded_serve_embedding_cache_bytes", 8388608, deployment="Segmenter"),
        "# TYPE ray_grounded_serve_events_total counter",
        series("ray_grounded_serve_events_total", 2, deployment="Ingress", event="task_errors"),
        series("ray_grounded_serve_events_total", 5, deployment="Ingress", replica="r9", event="task_errors"),
        "# TYPE ray_serve_num_http_requests_total counter",
        series("ray_serve_num_http_requests_total", 100, deployment="Ingress"),
    ])
    view = summarize(parse_samples(text, "grounded-serve"))
    detector = view["batch_sizes"]["Detector"]
    assert detector["batches_by_size"] == {"1": 3, "3": 3}  # two replicas added, cumulative buckets undone
    assert detector["items_by_batch_size"] == {"1": 3, "3": 9} and detector["max"] == 3
    assert detector["mean"] == 2.0
    assert view["batch_sizes"]["Segmenter"]["batches_by_size"] == {"8": 4}  # other apps are not counted
    assert view["counters"] == {"task_errors": 7}  # Serve's own series stay in Prometheus, not in this view
    cache = view["sam_embedding_cache"]
    assert (cache["hits"], cache["misses"]) == (3, 4)
    assert cache["replicas"]["r1"] == {"hits": 3, "misses": 4, "images_encoded": 4, "bytes": 8388608}


def test_an_empty_or_unreachable_endpoint_gives_an_empty_view():
    view = summarize(parse_samples("", "grounded-serve"))
    assert view["counters"] == {} and view["batch_sizes"] == {}
    assert view["sam_embedding_cache"] == {"hits": 0, "misses": 0, "replicas": {}}
