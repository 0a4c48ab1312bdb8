"""The Python per-call benchmark: `calls.py N [seed]` calls a small function
N times and prints `calls=N ns_per_call=…`. With `seed`, the function is
decorated by the seed library (omegi-instrumentation-python's own
decorator, OpenTelemetry's batch processor with an exporter that drops
everything), as its users ran it."""

import sys
import time


def leaf(x):
    return x + 1


def main():
    calls = int(sys.argv[1])
    function = leaf
    if "seed" in sys.argv[2:]:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

        from omegi.decorator.OmegiDecorator import omegi_decorator

        class Dropped(SpanExporter):
            def export(self, spans):
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Dropped()))
        trace.set_tracer_provider(provider)
        function = omegi_decorator(trace.get_tracer("bench"))(leaf)
    total = 0
    start = time.perf_counter_ns()
    for i in range(calls):
        total += function(i)
    took = time.perf_counter_ns() - start
    print(f"calls={calls} ns_per_call={took / calls:.1f} checksum={total}", flush=True)


main()
