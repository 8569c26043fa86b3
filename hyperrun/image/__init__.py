"""Images: content store, metadata, pull, unpack, rootfs images."""
