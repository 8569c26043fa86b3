"""runtime.v1.ImageService over the image service."""
from __future__ import annotations

import asyncio
import os
import time

from hyperrun import annotations
from hyperrun.image import reference
from hyperrun.image.auth import Credentials
from hyperrun.image.metadata import ImageRecord
from hyperrun.image.service import ImageService
from hyperrun.proto import cri_api_pb2 as cri
from hyperrun.proto import cri_api_pb2_grpc as cri_grpc

from .errors import rpc


def _tree_usage(root: str) -> tuple[int, int]:
    """(bytes allocated, files) under root."""
    used = inodes = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                used += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                continue
            inodes += 1
    return used, inodes


def _credentials(auth: cri.AuthConfig) -> Credentials | None:
    if not (auth.username or auth.auth or auth.identity_token or auth.registry_token):
        return None
    username, password = auth.username, auth.password
    if auth.auth and not username:
        import base64
        username, _, password = base64.b64decode(auth.auth).decode().partition(":")
    return Credentials(username=username, password=password,
                       identity_token=auth.identity_token, registry_token=auth.registry_token)


class ImageServicer(cri_grpc.ImageServiceServicer):
    def __init__(self, images: ImageService) -> None:
        self.images = images

    def _to_cri(self, image: ImageRecord) -> cri.Image:
        tags, digests = [], []
        for name in self.images.meta.names(image.digest):
            ref = reference.parse(name.name)
            if ref.tag is not None:
                tags.append(name.name)
            digests.append(f"{ref.name}@{name.repo_digest}")
        config = self.images.config(image).get("config") or {}
        result = cri.Image(id=image.config_digest, repo_tags=tags, repo_digests=sorted(set(digests)),
                           size=image.size, spec=cri.ImageSpec(image=image.config_digest))
        user = (config.get("User") or "").split(":")[0]
        if user.isdigit():
            result.uid.value = int(user)
        elif user:
            result.username = user
        return result

    @rpc
    async def ListImages(self, request, context):
        wanted = request.filter.image.image
        found = self.images.find(wanted) if wanted else None
        records = [found] if wanted else [s.image for s in self.images.list()]
        return cri.ListImagesResponse(images=[self._to_cri(i) for i in records if i])

    @rpc
    async def ImageStatus(self, request, context):
        image = self.images.find(request.image.image)
        if image is None:
            return cri.ImageStatusResponse()  # CRI: an absent image is not an error
        return cri.ImageStatusResponse(image=self._to_cri(image))

    @rpc
    async def PullImage(self, request, context):
        platform = request.image.annotations.get(annotations.PLATFORM) or "linux/amd64"
        image = await self.images.pull(request.image.image, auth=_credentials(request.auth),
                                       platform=platform, progress=False)
        names = self.images.meta.names(image.digest)
        ref = reference.parse(request.image.image)
        repo_digest = next((n.repo_digest for n in names if n.name == ref.key), image.digest)
        return cri.PullImageResponse(image_ref=f"{ref.name}@{repo_digest}")

    @rpc
    async def RemoveImage(self, request, context):
        # In the event loop's thread: the metadata connection is not shared
        # across threads (removal is row deletes and unlinks, quick).
        if self.images.find(request.image.image) is not None:
            self.images.remove(request.image.image)
        return cri.RemoveImageResponse()

    @rpc
    async def ImageFsInfo(self, request, context):
        root = str(self.images.root)
        # A walk of the whole store: off the event loop, which serves every RPC.
        used, inodes = await asyncio.to_thread(_tree_usage, root)
        usage = cri.FilesystemUsage(timestamp=time.time_ns(),
                                    fs_id=cri.FilesystemIdentifier(mountpoint=root))
        usage.used_bytes.value = used
        usage.inodes_used.value = inodes
        return cri.ImageFsInfoResponse(image_filesystems=[usage])
