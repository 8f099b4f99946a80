"""REST gateway: transcodes HTTP/JSON to the gRPC services from the google.api.http annotations."""
