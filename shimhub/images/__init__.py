"""Images: references, the OCI distribution client, the content store and the image store."""
