"""The daemon's HTTP side: the routes (app.py), the OpenAI dialect they speak (openai.py), and the ASGI and
socket plumbing under them (transport.py)."""
