"""Durable jobs: async chat tasks and batches (and, later, fine-tuning), run by one runner inside the server.

Never torch: jobs reach the engine through the platform's own services, as a request would.
"""
