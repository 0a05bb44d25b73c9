"""The serving core, free of any web framework: batcher, engine, runtime, admission, decode pool, reload."""
