"""Load-test harness: closed- and open-loop gRPC load, latency histograms and reports."""
