"""What the API (`app.api`) and the dashboard (`app.dashboard`) both build on, and neither owns:
API keys and the sign-in cookie, the per-app context and body reading, the backend protocol,
/health's view of the workers and the snapshot that moves the gauges."""
