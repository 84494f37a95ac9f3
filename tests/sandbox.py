"""
Run a command under the kernel restrictions a systemd unit's hardening
settings stand for, without systemd.

``python -m tests.sandbox SPEC.json -- PROGRAM ARGS...`` reads a JSON object
of unit settings (``{"NoNewPrivileges": "yes", "User": "nobody", ...}``),
applies each one's kernel mechanism to itself, checks that it took effect,
prints ``sandbox: applied NAME,...`` and then executes ``PROGRAM``.
Everything applied is inherited across ``execve``, so the program runs as
systemd would start it.  tests/test_contrib.py uses it to prove each setting
of ``contrib/hostlink-tw.service`` compatible with a real ``wss://`` session.

The mechanisms (what systemd itself does, or a stricter equivalent):

- ``MemoryDenyWriteExecute=yes``: ``prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)``.
- ``NoNewPrivileges=yes``: ``prctl(PR_SET_NO_NEW_PRIVS)``.
- ``RestrictAddressFamilies=...``, ``LockPersonality=yes``: one seccomp filter
  (``socket()`` of another family fails with EAFNOSUPPORT; ``personality()``
  may only query).
- ``ProtectSystem=strict``: a private mount namespace with every mount
  read-only (stricter than systemd, which leaves /dev, /proc, /sys to the
  options below), except ``StateDirectory=`` (given as ``state_directory``).
- ``ProtectHome=yes``: empty, inaccessible tmpfs on /home, /root, /run/user
  (``expose``, a space-separated list of paths, keeps those visible
  read-only: for a test interpreter that lives in a home directory).
- ``PrivateTmp=yes``: new tmpfs on /tmp and /var/tmp.
- ``PrivateDevices=yes``: a tmpfs /dev with only null, zero, full, random,
  urandom and tty.
- ``ProtectKernelTunables=yes``: /proc/sys and /sys read-only.
- ``ProtectControlGroups=yes``: /sys/fs/cgroup read-only.
- ``ProtectKernelModules=yes``: the module directories inaccessible; the
  capability goes with ``User=``.
- ``UMask=``, ``User=``, ``Group=``: umask, then setgroups/setgid/setuid.

Linux only, and all but the prctl settings need root (CAP_SYS_ADMIN).
"""

from __future__ import annotations

import ctypes
import errno
import grp
import json
import os
import platform
import pwd
import socket
import struct
import sys
from collections.abc import Callable

PR_SET_NO_NEW_PRIVS, PR_GET_NO_NEW_PRIVS = 38, 39
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1

CLONE_NEWNS = 0x20000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (Linux >= 5.12)
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY = 0x1

# (audit arch, socket(), personality()) per machine.
_SYSCALLS = {
    "x86_64": (0xC000003E, 41, 135),
    "aarch64": (0xC00000B7, 198, 92),
}
_FAMILIES = {"AF_INET": socket.AF_INET, "AF_INET6": socket.AF_INET6, "AF_UNIX": socket.AF_UNIX}

_libc = ctypes.CDLL(None, use_errno=True)


class SandboxError(Exception):
    """A restriction could not be applied (the message says which and why)."""


def _check(result: int, what: str) -> int:
    if result < 0:
        e = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(e)} (errno {e})")
    return result


def _prctl(option: int, arg: int = 0) -> int:
    return int(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0))


def mdwe_supported() -> bool:
    """Whether this kernel has PR_SET_MDWE (Linux >= 6.3); harmless to ask."""
    return _prctl(PR_GET_MDWE) >= 0


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    _check(
        _libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def _set_readonly(path: str, recursive: bool, readonly: bool = True) -> None:
    # struct mount_attr {u64 attr_set, attr_clr, propagation, userns_fd}
    attr = struct.pack(
        "QQQQ", MOUNT_ATTR_RDONLY if readonly else 0, 0 if readonly else MOUNT_ATTR_RDONLY, 0, 0
    )
    buf = ctypes.create_string_buffer(attr, len(attr))
    flags = AT_RECURSIVE if recursive else 0
    _check(
        _libc.syscall(
            ctypes.c_long(SYS_MOUNT_SETATTR),
            ctypes.c_int(AT_FDCWD),
            path.encode(),
            ctypes.c_uint(flags),
            buf,
            ctypes.c_size_t(len(attr)),
        ),
        f"mount_setattr {path}",
    )


def _bind_readonly(path: str) -> None:
    if os.path.isdir(path):
        _mount(path, path, None, MS_BIND | MS_REC)
        _set_readonly(path, recursive=True)


def _inaccessible(path: str) -> None:
    if os.path.isdir(path):
        _mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=000")


def _home_showing(home: str, paths: list[str], mode: str = "755") -> None:
    """
    An empty ``home`` that shows ``paths`` (read-only): only for a test
    interpreter or checkout under a home directory (pyenv in /root) or /tmp,
    as a unit would do with ``ProtectHome=tmpfs`` and ``BindReadOnlyPaths=``.
    """
    fds = [os.open(p, os.O_PATH | os.O_DIRECTORY) for p in paths]  # before the tmpfs hides them
    try:
        _mount("tmpfs", home, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode}")
        for path, fd in zip(paths, fds, strict=True):
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            _set_readonly(path, recursive=True)
    finally:
        for fd in fds:
            os.close(fd)
    if mode == "755":
        _set_readonly(home, recursive=False)


def _private_devices() -> None:
    _mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755")
    for name, minor in (("null", 3), ("zero", 5), ("full", 7), ("random", 8), ("urandom", 9)):
        os.mknod(f"/dev/{name}", 0o20666, os.makedev(1, minor))
        os.chmod(f"/dev/{name}", 0o666)
    os.mknod("/dev/tty", 0o20666, os.makedev(5, 0))
    os.chmod("/dev/tty", 0o666)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, f"/dev/{name}")
    os.mkdir("/dev/shm", 0o1777)
    _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")


def _seccomp(families: list[int] | None, lock_personality: bool) -> None:
    machine = platform.machine()
    if machine not in _SYSCALLS:
        raise SandboxError(f"no seccomp syscall numbers for {machine}")
    arch, nr_socket, nr_personality = _SYSCALLS[machine]
    allow = 0x7FFF0000
    ld, jeq, ret = 0x20, 0x15, 0x06
    ret_errno = 0x00050000

    def stmt(code: int, k: int) -> tuple[int, int, int, int]:
        return (code, 0, 0, k)

    prog: list[tuple[int, int, int, int]] = [
        stmt(ld, 4),  # seccomp_data.arch
        (jeq, 1, 0, arch),
        stmt(ret, allow),  # another ABI: not what this proof is about
        stmt(ld, 0),  # seccomp_data.nr
    ]
    if families is not None:
        checks = [(jeq, len(families) - i, 0, f) for i, f in enumerate(families)]
        block = [stmt(ld, 16), *checks, stmt(ret, ret_errno | errno.EAFNOSUPPORT), stmt(ret, allow)]
        prog += [(jeq, 0, len(block), nr_socket), *block]
    if lock_personality:
        block = [stmt(ld, 16), (jeq, 1, 0, 0xFFFFFFFF), stmt(ret, ret_errno | errno.EPERM)]
        prog += [(jeq, 0, len(block), nr_personality), *block]
    prog.append(stmt(ret, allow))
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    filters = ctypes.create_string_buffer(raw, len(raw))

    class _Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = _Prog(len(prog), ctypes.cast(filters, ctypes.c_void_p))
    _check(
        _libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog), 0, 0),
        "seccomp filter",
    )


def _expect_error(action: Callable[[], object], errnos: tuple[int, ...], what: str) -> None:
    try:
        result = action()
    except OSError as e:
        if e.errno in errnos:
            return
        raise SandboxError(f"{what}: unexpected {e!r}") from None
    if isinstance(result, socket.socket):
        result.close()
    raise SandboxError(f"{what}: not in effect")


def apply(spec: dict[str, str]) -> list[str]:
    """Apply ``spec``'s settings to this process; return their names, in order."""
    applied: list[str] = []
    mount_settings = {
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectControlGroups",
        "ProtectKernelModules",
    }
    if mount_settings & set(spec):
        _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
    if spec.get("ProtectSystem") == "strict":
        _set_readonly("/", recursive=True)
        state = spec.get("state_directory")
        if state:
            _mount(state, state, None, MS_BIND)
            _set_readonly(state, recursive=False, readonly=False)
        _expect_error(lambda: open("/.sandbox-probe", "w"), (errno.EROFS,), "ProtectSystem")
        applied.append("ProtectSystem")
    if spec.get("ProtectHome") == "yes":
        exposed = spec.get("expose", "").split()
        for home in ("/home", "/root", "/run/user"):
            inside = [p for p in exposed if p.startswith(home + "/")]
            if inside and os.path.isdir(home):
                _home_showing(home, inside)
            else:
                _inaccessible(home)
        applied.append("ProtectHome")
    if spec.get("PrivateTmp") == "yes":
        exposed = spec.get("expose", "").split()
        for path in ("/tmp", "/var/tmp"):  # noqa: S108 - the directories being replaced
            inside = [p for p in exposed if p.startswith(path + "/")]
            if inside and os.path.isdir(path):
                _home_showing(path, inside, mode="1777")
            elif os.path.isdir(path):
                _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
        applied.append("PrivateTmp")
    state = spec.get("state_directory")
    if state and spec.get("expose") and mount_settings & set(spec):
        # An exposed (read-only) checkout may hold the state directory: it
        # stays writable, as StateDirectory= makes it.
        _mount(state, state, None, MS_BIND)
        _set_readonly(state, recursive=False, readonly=False)
    if spec.get("PrivateDevices") == "yes":
        _private_devices()
        _expect_error(lambda: os.stat("/dev/kmsg"), (errno.ENOENT,), "PrivateDevices")
        applied.append("PrivateDevices")
    if spec.get("ProtectKernelTunables") == "yes":
        _bind_readonly("/proc/sys")
        _bind_readonly("/sys")
        applied.append("ProtectKernelTunables")
    if spec.get("ProtectControlGroups") == "yes":
        _bind_readonly("/sys/fs/cgroup")
        applied.append("ProtectControlGroups")
    if spec.get("ProtectKernelModules") == "yes":
        for path in ("/usr/lib/modules", "/lib/modules"):
            if os.path.isdir(path) and not os.path.ismount(path):
                _inaccessible(path)
        applied.append("ProtectKernelModules")
    families = spec.get("RestrictAddressFamilies")
    lock = spec.get("LockPersonality") == "yes"
    if families is not None or lock:
        numbers = None if families is None else [_FAMILIES[f] for f in families.split()]
        _seccomp(numbers, lock)
        if numbers is not None:
            _expect_error(
                lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW),
                (errno.EAFNOSUPPORT,),
                "RestrictAddressFamilies",
            )
            applied.append("RestrictAddressFamilies")
        if lock:
            # Changing the execution domain (here to PER_LINUX32) must fail;
            # querying (0xffffffff) still works.
            if _libc.personality(ctypes.c_ulong(0x0008)) != -1:
                raise SandboxError("LockPersonality: not in effect")
            applied.append("LockPersonality")
    if "UMask" in spec:
        os.umask(int(spec["UMask"], 8))
        applied.append("UMask")
    if "Group" in spec:
        os.setgroups([])
        os.setgid(grp.getgrnam(spec["Group"]).gr_gid)
        applied.append("Group")
    if "User" in spec:
        os.setuid(pwd.getpwnam(spec["User"]).pw_uid)
        if os.geteuid() == 0:
            raise SandboxError("User: still root")
        applied.append("User")
    if spec.get("NoNewPrivileges") == "yes":
        _check(_prctl(PR_SET_NO_NEW_PRIVS, 1), "PR_SET_NO_NEW_PRIVS")
        if _prctl(PR_GET_NO_NEW_PRIVS) != 1:
            raise SandboxError("NoNewPrivileges: not in effect")
        applied.append("NoNewPrivileges")
    if spec.get("MemoryDenyWriteExecute") == "yes":
        _check(_prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN), "PR_SET_MDWE")
        if not _prctl(PR_GET_MDWE) & PR_MDWE_REFUSE_EXEC_GAIN:
            raise SandboxError("MemoryDenyWriteExecute: not in effect")
        applied.append("MemoryDenyWriteExecute")
    return applied


def main(argv: list[str]) -> None:
    """``SPEC.json -- PROGRAM ARGS...``: apply SPEC, then become PROGRAM."""
    if len(argv) < 3 or argv[1] != "--":
        sys.exit("usage: python -m tests.sandbox SPEC.json -- PROGRAM ARGS...")
    with open(argv[0], encoding="utf-8") as f:
        spec = json.load(f)
    try:
        applied = apply(spec)
    except (SandboxError, OSError) as e:
        sys.exit(f"sandbox: {e}")
    sys.stdout.write(f"sandbox: applied {','.join(applied)}\n")
    sys.stdout.flush()
    os.execv(argv[2], argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
