# Developer shortcuts. Installing and testing are in README.md.

PROTOS := proto/shimhub_proto/cri/v1/api.proto

.PHONY: proto lint
proto:  ## regenerate the Python stubs after editing a .proto file
	python -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto $(PROTOS)

lint:
	ruff check . && ruff format --check shimhub tests plugins bench
