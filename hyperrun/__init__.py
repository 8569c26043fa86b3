"""hyperrun: OCI images as lightweight virtual machines.

Kept empty on purpose: the guest image ships parts of this package
(the channel framing and generated protobuf code), so importing it must
pull in nothing else.
"""
