"""The streaming server: where the CRI's Exec, Attach and PortForward point.

Those three RPCs carry no data. The daemon registers the request here and
answers with a one-time URL (``http://127.0.0.1:PORT/exec/<token>``); the
client (crictl, critest, the kubelet proxying ``kubectl exec``) connects to
that URL and speaks one of the kubelet's streaming protocols, the ones
``k8s.io/kubelet/pkg/cri/streaming`` serves for containerd and CRI-O:

- **SPDY/3.1** (``Upgrade: SPDY/3.1``), negotiated with
  ``X-Stream-Protocol-Version``: remote command ``v5``/``v4``/``v3``/``v2``
  ``.channel.k8s.io`` and ``channel.k8s.io`` (the client opens streams
  typed ``error``, ``stdin``, ``stdout``, ``stderr``, ``resize``), port
  forward ``portforward.k8s.io`` (a ``data`` and an ``error`` stream per
  forwarded connection, with ``port`` and ``requestID`` headers). This is
  what client-go's ``NewSPDYExecutor`` and ``portforward`` use, so crictl
  and critest.
- **WebSocket** with the ``channel.k8s.io`` framing (first byte of each
  message = channel: 0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize):
  subprotocols ``v5.channel.k8s.io`` (adds the close signal ``[255, ch]``),
  ``v4.channel.k8s.io``, ``v4.base64.channel.k8s.io``, ``channel.k8s.io``,
  ``base64.channel.k8s.io``; port forward over WebSocket as the kubelet
  (``?port=`` or the request's ports; channel 2i data, 2i+1 error).

The v4/v5 ``error`` stream ends with a JSON ``metav1.Status`` carrying the
exit code; older versions send only a failure's message.

Containers are reached through ``server.Backend`` (the daemon implements it
over the guest agent). The package is shaped as the kubelet's
``pkg/kubelet/cri/streaming``: ``server`` (tokens, URLs, the HTTP request
head, parsed by hand: a loopback server with one kind of request),
``remotecommand`` (exec and attach over either transport),
``portforward`` (port forward over either transport),
``spdy`` (SPDY/3.1 framing and connections, written here: SPDY has no
maintained Python implementation), ``websocket`` (the channel.k8s.io
framing over the ``websockets`` library's sans-I/O protocol), ``stream``
(what a stream of either transport is).
"""
from .server import (AttachRequestInfo, ExecRequestInfo, InvalidRequest, PortForwardRequestInfo,
                     StreamingServer, TooManyRequests)

__all__ = ["AttachRequestInfo", "ExecRequestInfo", "InvalidRequest", "PortForwardRequestInfo",
           "StreamingServer", "TooManyRequests"]
