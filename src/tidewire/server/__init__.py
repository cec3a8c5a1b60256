"""The HTTP and WebSocket side: routes by concern, the transport that writes logs, and the
pure header, name and multipart logic they share."""

#: Scope key: the `send` the app's outermost layer (observe.Observe) was given,
#: below none of the app's own middleware. A stream writes its events there once
#: its first write has gone through them all (transport.LogResponse): the layers
#: inside act on a stream's start only, and each would cost a call per event per
#: subscriber.
SERVER_SEND = "tidewire.server_send"
