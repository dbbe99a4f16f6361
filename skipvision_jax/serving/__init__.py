"""Serving: OpenAI's chat completions API (api.py) over a continuous-batching
scheduler (scheduler.py) that owns decode slots on the device (slots.py)."""
