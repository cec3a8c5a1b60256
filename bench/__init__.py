"""Side-by-side benchmarks: tidewire vs the original service, FastAPI, sse-starlette, Nchan."""
