"""The HTTP and WebSocket side: routes by concern, the transport that writes logs, and the
pure header, name and multipart logic they share."""
