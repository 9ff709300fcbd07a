"""Prometheus metrics: counters the status document does not carry (``tally``), the metric
families built from the document and those counters at each scrape (``families``), and where
they go: an HTTP ``/metrics`` listener or a node_exporter textfile (``output``)."""
