"""Server-side code shared by the API and the workers: Redis key space, stores, queue, pipeline."""
