"""Code generated from ../../proto by grpcio-tools (`make proto`). Never edit
the *_pb2.py files by hand; tests/unit/test_proto.py checks they match."""
