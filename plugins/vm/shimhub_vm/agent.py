"""The agent inside a VM pod: PID 1 of the guest, running the pod's containers with runc.

It talks to shimhub over the virtio-serial port named ``shimhub.agent`` (see
`channel` for the protocol). Every call runs on a thread of its own; a
container's or exec'd process's output is sent as stream messages under the
process's id. The agent keeps every container's state in memory: when
shimhub restarts, it reconnects and finds them all, and output written
meanwhile waits in the port (its writes block while nobody reads).

Standard library only: it runs on the guest's own Python.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path
from typing import Any

from shimhub_vm import channel

RUNC = ["runc", "--root", "/run/runc"]
CONTAINERS = Path("/run/containers")
CONSOLES = Path("/run/consoles")
SHARED = "/run/shared"
SHARE_TAG = "shimhub"


class CallError(Exception):
    """An error the host sees with a gRPC-style `code`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _children_of(pid: int) -> list[int]:
    """The children of process `pid`, from /proc (the guest has no psutil)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _kill_tree(pid: int, timeout: float = 5.0) -> None:
    """SIGKILL `pid` and its descendants, the deepest first, each level gone before the next is killed."""
    levels = [[pid]]
    while levels[-1]:
        levels.append([child for parent in levels[-1] for child in _children_of(parent)])
    deadline = time.monotonic() + timeout
    for level in reversed(levels):
        for member in level:
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, signal.SIGKILL)
        reaped_by_parents = [member for member in level if member != pid]  # the top one is the agent's to reap
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{m}") for m in reaped_by_parents):
            time.sleep(0.01)


def _run(*args: str, stdin: bytes | None = None) -> str:
    result = subprocess.run(list(args), input=stdin, capture_output=True, check=False)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).decode(errors="replace").strip()
        raise CallError("FAILED_PRECONDITION", f"{' '.join(args[:3])}: {detail or f'exit code {result.returncode}'}")
    return result.stdout.decode(errors="replace")


class Process:
    """A process whose output the agent relays: a container's init or an exec'd command."""

    def __init__(self, sid: str) -> None:
        self.sid = sid
        self.pid = 0
        self.stdin: int | None = None
        #: The master end of the process's terminal, if it has one.
        self.terminal: int | None = None
        self.exit_code: int | None = None
        self.started_at = 0
        self.finished_at = 0
        self.exited = threading.Event()

    def relay(self, agent: Agent, outputs: dict[int, int]) -> None:
        """Send what `outputs` (fd number -> pipe read end) carry until all end, then an eof message."""
        open_fds = dict(outputs)
        while open_fds:
            ready, _, _ = select.select(list(open_fds.values()), [], [])
            for number, fd in list(open_fds.items()):
                if fd not in ready:
                    continue
                try:
                    data = os.read(fd, channel.CHUNK)
                except OSError:  # a terminal whose other end closed
                    data = b""
                if data:
                    agent.send({"stream": self.sid, "fd": number, "data": channel.encode(data)})
                else:
                    os.close(fd)
                    del open_fds[number]
        agent.send({"stream": self.sid, "eof": True})

    def finish(self, status: int) -> None:
        self.exit_code = os.waitstatus_to_exitcode(status)
        if self.exit_code < 0:
            self.exit_code = 128 - self.exit_code
        self.finished_at = time.time_ns()
        self.exited.set()


class Agent:
    """The agent's state and its calls (methods named ``call_<name>``)."""

    def __init__(self, port: int) -> None:
        self.channel = channel.Channel(port)
        self.processes: dict[str, Process] = {}
        self.ports: dict[str, socket.socket] = {}
        self.lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        self.channel.send(message)

    # -- the pod --------------------------------------------------------------

    def call_ping(self) -> dict[str, Any]:
        return {"kernel": os.uname().release, "pid": os.getpid()}

    def call_clock(self, step_ns: int = 0) -> dict[str, Any]:
        """The guest's wall clock, after stepping it by `step_ns` (the RTC it booted from has whole seconds)."""
        if step_ns:
            time.clock_settime_ns(time.CLOCK_REALTIME, time.time_ns() + step_ns)
        return {"now_ns": time.time_ns()}

    def call_setup_pod(
        self,
        hostname: str,
        interfaces: list[dict[str, Any]],
        routes: list[dict[str, str]],
        share: bool,
        *,
        share_wait: float = 0.0,
        seed: str = "",
    ) -> dict[str, Any]:
        """Name the VM, configure its network as the pod's CNI interfaces were, mount the shared directory.

        An interface's "guest_mac", when given, is the address the guest's device has now (a VM restored from
        a template): it is given the pod's. `share_wait` is how long the share may take to appear (plugged
        in after a restore). `seed` (hex) is mixed into the kernel's random pool: VMs restored from one template
        would otherwise start from the same random state."""
        if seed:
            with open("/dev/urandom", "wb") as pool:
                pool.write(bytes.fromhex(seed))
        if hostname:
            socket.sethostname(hostname)  # the system call: no option parsing of a request's text
        _run("ip", "link", "set", "dev", "lo", "up")
        by_mac = {
            Path(p).parent.name: Path(p).read_text().strip() for p in map(str, Path("/sys/class/net").glob("*/address"))
        }
        for interface in interfaces:
            current = str(interface.get("guest_mac") or interface["mac"]).lower()
            name = next((n for n, mac in by_mac.items() if mac == current), None)
            if name is None:
                raise CallError("FAILED_PRECONDITION", f"no guest interface with MAC {current}")
            if current != interface["mac"].lower():
                _run("ip", "link", "set", "dev", name, "address", interface["mac"])
            if interface.get("mtu"):
                _run("ip", "link", "set", "dev", name, "mtu", str(interface["mtu"]))
            for address in interface["addresses"]:
                _run("ip", "addr", "add", address, "dev", name)
            _run("ip", "link", "set", "dev", name, "up")
        for route in routes:
            _run("ip", "route", "add", route["dst"], *(["via", route["via"]] if route.get("via") else []))
        if share:
            os.makedirs(SHARED, exist_ok=True)
            deadline = time.monotonic() + share_wait
            while True:
                try:
                    _run("mount", "-t", "virtiofs", SHARE_TAG, SHARED)
                    break
                except CallError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        return {}

    # -- containers -------------------------------------------------------------

    def _process(self, sid: str) -> Process:
        process = self.processes.get(sid)
        if process is None:
            raise CallError("NOT_FOUND", f"no process {sid[:12]} in the VM")
        return process

    def _spawn(
        self, sid: str, command: list[str], container: str, *, stdin: bool, tty: bool
    ) -> tuple[Process, subprocess.Popen[bytes]]:
        """Start runc `command` for `container`, the process's stdio relayed under `sid`.

        Without `tty` the process gets pipes; with it, a terminal whose master end
        runc hands over on a console socket.
        """
        process = Process(sid)
        if tty:
            console = CONSOLES / f"{os.urandom(8).hex()}.sock"
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(console))
            listener.listen(1)
            try:
                child = subprocess.Popen(
                    [*command, "--console-socket", str(console), container], stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                master = _receive_terminal(listener, child)
            finally:
                listener.close()
                console.unlink(missing_ok=True)
            if master is None:
                return process, child  # runc failed before handing over a terminal
            process.terminal, process.stdin = master, os.dup(master)
            outputs = {1: master}
        else:
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            in_r, in_w = os.pipe() if stdin else (os.open(os.devnull, os.O_RDONLY), -1)
            try:
                child = subprocess.Popen([*command, container], stdin=in_r, stdout=out_w, stderr=err_w)
            finally:
                for fd in (in_r, out_w, err_w):
                    os.close(fd)
            process.stdin = in_w if in_w >= 0 else None
            outputs = {1: out_r, 2: err_r}
        with self.lock:
            self.processes[sid] = process
        threading.Thread(target=process.relay, args=(self, outputs), daemon=True).start()
        return process, child

    def call_create(self, id: str, spec: dict[str, Any], rootfs: dict[str, str], stdin: bool) -> dict[str, Any]:
        """Create container `id` from OCI `spec`; its root is a shared directory or a block device."""
        if id in self.processes:
            raise CallError("ALREADY_EXISTS", f"container {id[:12]} exists in the VM")
        bundle = CONTAINERS / id
        (bundle / "rootfs").mkdir(parents=True, exist_ok=True)
        if rootfs["type"] == "shared":
            spec["root"]["path"] = os.path.join(SHARED, rootfs["path"])
        else:
            _run("mount", "-t", "ext4", _block_device(rootfs["serial"]), str(bundle / "rootfs"))
            spec["root"]["path"] = str(bundle / "rootfs")
        spec["mounts"] = [
            {**m, "source": os.path.join(SHARED, m["source"])} if m.get("shared") else m for m in spec["mounts"]
        ]
        (bundle / "config.json").write_text(json.dumps(spec))
        tty = bool(spec["process"].get("terminal"))
        process = self._start(id, ["create", "--bundle", str(bundle)], id, bundle, stdin=stdin, tty=tty)
        return {"pid": process.pid}

    def _start(
        self, sid: str, command: list[str], container: str, directory: Path, *, stdin: bool, tty: bool
    ) -> Process:
        """Run a detached runc `command` (create, exec) for `container`; the process it started, reaped by us."""
        log = directory / "runc.log"
        argv = [*RUNC, "--log", str(log), "--log-format", "json", *command, "--pid-file", str(directory / "pid")]
        process, child = self._spawn(sid, argv, container, stdin=stdin, tty=tty)
        if child.wait() != 0:
            self._forget(sid)
            raise CallError(
                "FAILED_PRECONDITION", f"runc {command[0]}: {_last_error(log) or f'exit code {child.returncode}'}"
            )
        process.pid = int((directory / "pid").read_text())
        threading.Thread(target=self._reap, args=(process,), daemon=True).start()
        return process

    def _reap(self, process: Process) -> None:
        _, status = os.waitpid(process.pid, 0)
        process.finish(status)

    def _forget(self, sid: str) -> None:
        with self.lock:
            process = self.processes.pop(sid, None)
        if process is not None and process.stdin is not None:
            os.close(process.stdin)
            process.stdin = None

    def call_start(self, id: str) -> dict[str, Any]:
        process = self._process(id)
        started = time.time_ns()  # before: the process may have exited by the time `start` returns
        _run(*RUNC, "start", id)
        process.started_at = started
        return {}

    def call_state(self, id: str) -> dict[str, Any]:
        process = self._process(id)
        return {
            "status": "exited" if process.exited.is_set() else "running" if process.started_at else "created",
            "pid": process.pid,
            "exit_code": process.exit_code,
            "started_at": process.started_at,
            "finished_at": process.finished_at,
        }

    def call_wait(self, id: str, seconds: float) -> dict[str, Any]:
        process = self._process(id)
        return {"exited": process.exited.wait(seconds), "exit_code": process.exit_code}

    def call_kill(self, id: str, signal_name: str, all: bool) -> dict[str, Any]:
        process = self._process(id)
        if process.exited.is_set():
            return {}
        if id.startswith("exec-") and signal_name == "SIGKILL":
            _kill_tree(process.pid)  # what the command started too, or it would outlive an ExecSync timeout
        elif id.startswith("exec-"):
            os.kill(process.pid, signal.Signals[signal_name])
        else:
            _run(*RUNC, "kill", *(["--all"] if all else []), id, signal_name)
        return {}

    def call_delete(self, id: str) -> dict[str, Any]:
        """Remove container `id` and what it holds in the VM. Idempotent."""
        subprocess.run([*RUNC, "delete", "--force", id], capture_output=True, check=False)
        bundle = CONTAINERS / id
        if os.path.ismount(bundle / "rootfs"):
            _run("umount", str(bundle / "rootfs"))
        shutil.rmtree(bundle, ignore_errors=True)
        self._forget(id)
        return {}

    def call_stats(self, id: str) -> dict[str, Any]:
        self._process(id)
        return json.loads(_run(*RUNC, "events", "--stats", id)).get("data", {})

    def call_update(self, id: str, resources: dict[str, Any]) -> dict[str, Any]:
        self._process(id)
        _run(*RUNC, "update", "--resources", "-", id, stdin=json.dumps(resources).encode())
        return {}

    # -- exec and port forwarding -----------------------------------------------------

    def call_exec(self, id: str, exec_id: str, args: list[str], stdin: bool, tty: bool) -> dict[str, Any]:
        """Run `args` in container `id` as its main process runs (user, environment, directory);
        the output is relayed under `exec_id`."""
        self._process(id)
        directory = CONTAINERS / exec_id
        directory.mkdir()
        process = json.loads((CONTAINERS / id / "config.json").read_text())["process"]
        (directory / "process.json").write_text(json.dumps({**process, "args": args, "terminal": tty}))
        try:
            command = ["exec", "--detach", "--process", str(directory / "process.json")]
            self._start(exec_id, command, id, directory, stdin=stdin, tty=tty)
        except CallError:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return {}

    def call_resize(self, id: str, width: int, height: int) -> dict[str, Any]:
        """Resize process `id`'s terminal (nothing to do without one)."""
        process = self._process(id)
        if process.terminal is not None:
            fcntl.ioctl(process.terminal, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))
        return {}

    def call_forget(self, id: str) -> dict[str, Any]:
        """Drop an exec'd process that ended (the host read its exit code)."""
        self._forget(id)
        shutil.rmtree(CONTAINERS / id, ignore_errors=True)
        return {}

    def call_port_open(self, sid: str, port: int) -> dict[str, Any]:
        """Connect to TCP `port` on the VM's loopback and relay the connection as stream `sid`."""
        try:
            connection = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError as exc:
            raise CallError("UNAVAILABLE", f"cannot connect to port {port} in the pod ({exc.strerror})") from None
        connection.settimeout(None)
        self.ports[sid] = connection

        def relay() -> None:
            while True:
                try:
                    data = connection.recv(channel.CHUNK)
                except OSError:
                    data = b""
                if not data:
                    break
                self.send({"stream": sid, "fd": 1, "data": channel.encode(data)})
            self.ports.pop(sid, None)
            connection.close()
            self.send({"stream": sid, "eof": True})

        threading.Thread(target=relay, daemon=True).start()
        return {}

    def stream_input(self, message: dict[str, Any]) -> None:
        """Input from the host for a process's stdin or a forwarded port."""
        sid = message["stream"]
        connection = self.ports.get(sid)
        if connection is not None:
            with contextlib.suppress(OSError):  # the connection ended on the pod's side
                if "data" in message:
                    connection.sendall(channel.decode(message["data"]))
                else:
                    connection.shutdown(socket.SHUT_WR)  # the client is done sending; the answer may follow
            return
        process = self.processes.get(sid)
        if process is None or process.stdin is None:
            return
        if "data" in message:
            with contextlib.suppress(OSError):  # the process closed its stdin
                os.write(process.stdin, channel.decode(message["data"]))
        else:
            os.close(process.stdin)
            process.stdin = None

    # -- the loop ---------------------------------------------------------------------

    def handle(self, message: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"id": message["id"]}
        try:
            method = getattr(self, "call_" + str(message["call"]), None)
            if method is None:
                raise CallError("UNIMPLEMENTED", f"the agent has no call {message['call']!r}")
            reply["result"] = method(**message.get("args", {}))
        except CallError as exc:
            reply["error"] = {"code": exc.code, "message": str(exc)}
        except Exception as exc:  # noqa: BLE001 - reported to the host, which shows it to the client
            reply["error"] = {"code": "INTERNAL", "message": f"{type(exc).__name__}: {exc}"}
        self.send(reply)

    def serve(self) -> None:
        while True:
            try:
                message = self.channel.receive()
            except channel.ChannelClosed:
                self.channel.reset()
                time.sleep(0.05)  # no host connected: the port reads as closed until one is
                continue
            if "stream" in message:
                self.stream_input(message)
            elif "id" in message:
                threading.Thread(target=self.handle, args=(message,), daemon=True).start()


def _receive_terminal(listener: socket.socket, child: subprocess.Popen[bytes]) -> int | None:
    """The terminal master runc sends to the console socket; None if runc exits first."""
    listener.settimeout(0.1)
    while True:
        try:
            connection, _ = listener.accept()
            break
        except TimeoutError:
            if child.poll() is not None:
                return None
    with connection:
        connection.settimeout(30)
        _, fds, _, _ = socket.recv_fds(connection, 4096, 1)
    return fds[0] if fds else None


def _last_error(log: Path) -> str:
    """The last error runc logged (its JSON log), "" if none."""
    message = ""
    try:
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("level") == "error":
                message = entry.get("msg", "")
    except (OSError, ValueError):
        pass
    return message


def _block_device(serial: str) -> str:
    """The /dev node of the disk the host attached with `serial` (waits for it to appear)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for block in Path("/sys/block").iterdir():
            for name in ("device/serial", "serial"):
                try:
                    found = (block / name).read_text().strip()
                except OSError:
                    continue
                if found == serial:
                    return f"/dev/{block.name}"
            wwid = block / "device" / "vpd_pg80"
            if wwid.exists() and serial.encode() in wwid.read_bytes():
                return f"/dev/{block.name}"
        time.sleep(0.05)
    raise CallError("DEADLINE_EXCEEDED", f"the disk with serial {serial} did not appear in the VM")


def _find_port(name: str) -> str:
    for entry in Path("/sys/class/virtio-ports").iterdir():
        if (entry / "name").read_text().strip() == name:
            return f"/dev/{entry.name}"
    raise SystemExit(f"shimhub agent: no virtio-serial port named {name}")


def _prepare() -> None:
    """Mount what runc needs in the guest."""
    for target, kind in (("/run", "tmpfs"), ("/tmp", "tmpfs"), ("/sys/fs/cgroup", "cgroup2"), ("/dev/pts", "devpts")):
        os.makedirs(target, exist_ok=True)
        subprocess.run(["mount", "-t", kind, kind, target], check=False)
    os.makedirs("/dev/shm", exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "shm", "/dev/shm"], check=False)
    for controller in ("cpu", "memory", "pids"):
        try:
            with open("/sys/fs/cgroup/cgroup.subtree_control", "w") as control:
                control.write(f"+{controller}")
        except OSError as exc:
            print(f"shimhub agent: cgroup controller {controller} unavailable: {exc}", file=sys.stderr)
    CONTAINERS.mkdir(parents=True, exist_ok=True)
    CONSOLES.mkdir(parents=True, exist_ok=True)


def main() -> None:
    _prepare()
    port = os.open(_find_port("shimhub.agent"), os.O_RDWR)
    print(f"shimhub agent: serving on pid {os.getpid()}", file=sys.stderr, flush=True)
    Agent(port).serve()


if __name__ == "__main__":
    main()
