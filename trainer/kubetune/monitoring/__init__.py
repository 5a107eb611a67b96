"""The Grafana dashboard and Prometheus alert rules, generated from code (`make monitoring`).

Both are built from the metric names in kubetune.contract; the chart ships the generated files.
"""
