"""Slide jobs: the store (`store`, `s3_store`) and the runner that owns their asyncio tasks (`runner`)."""
