"""The CRI ImageService: pull, list, status, remove, and image filesystem usage."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc

from shimhub.images.auth import credentials_from_request
from shimhub.images.store import ImageRecord
from shimhub.services.runtime.wire import chunks
from shimhub_proto.cri.v1 import api_pb2 as cri

if TYPE_CHECKING:
    from shimhub.daemon import Daemon


def image_message(record: ImageRecord) -> cri.Image:
    """The CRI Image of a record."""
    uid, username = record.user()
    return cri.Image(
        id=record.id,
        repo_tags=record.repo_tags,
        repo_digests=record.repo_digests,
        size=record.size,
        uid=cri.Int64Value(value=uid) if uid is not None else None,
        username=username,
        spec=cri.ImageSpec(image=record.id),
    )


class ImageService:
    """Implements runtime.v1.ImageService on top of a Daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def _list(self, query: cri.ImageFilter) -> list[cri.Image]:
        store = self.daemon.images.images
        if query.image.image:
            found = store.find(query.image.image)
            return [image_message(found)] if found else []
        return [image_message(record) for record in store.all()]

    def ListImages(self, request: cri.ListImagesRequest, context: grpc.ServicerContext) -> cri.ListImagesResponse:
        return cri.ListImagesResponse(images=self._list(request.filter))

    def StreamImages(
        self, request: cri.StreamImagesRequest, context: grpc.ServicerContext
    ) -> Iterator[cri.StreamImagesResponse]:
        for part in chunks(self._list(request.filter)):
            yield cri.StreamImagesResponse(images=part)

    def ImageStatus(self, request: cri.ImageStatusRequest, context: grpc.ServicerContext) -> cri.ImageStatusResponse:
        record = self.daemon.images.images.find(request.image.image)
        if record is None:
            return cri.ImageStatusResponse()  # the CRI's "not present": no image, no error
        info = {"info": json.dumps({"config": record.config, "layers": len(record.layers)})} if request.verbose else {}
        return cri.ImageStatusResponse(image=image_message(record), info=info)

    def PullImage(self, request: cri.PullImageRequest, context: grpc.ServicerContext) -> cri.PullImageResponse:
        creds = credentials_from_request(request.auth) if request.HasField("auth") else None
        record = self.daemon.pull_image(request.image.image, creds, context.is_active)
        return cri.PullImageResponse(image_ref=record.id)

    def RemoveImage(self, request: cri.RemoveImageRequest, context: grpc.ServicerContext) -> cri.RemoveImageResponse:
        self.daemon.remove_image(request.image.image)
        return cri.RemoveImageResponse()

    def ImageFsInfo(self, request: cri.ImageFsInfoRequest, context: grpc.ServicerContext) -> cri.ImageFsInfoResponse:
        now = time.time_ns()
        images, containers = self.daemon.filesystem_usage()

        def usage(mountpoint: str, used: int, inodes: int) -> cri.FilesystemUsage:
            return cri.FilesystemUsage(
                timestamp=now,
                fs_id=cri.FilesystemIdentifier(mountpoint=mountpoint),
                used_bytes=cri.UInt64Value(value=used),
                inodes_used=cri.UInt64Value(value=inodes),
            )

        return cri.ImageFsInfoResponse(image_filesystems=[usage(*images)], container_filesystems=[usage(*containers)])
