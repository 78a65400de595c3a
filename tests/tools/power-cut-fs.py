#!/usr/bin/python3
"""A FUSE file system that forgets what was not synced: a power cut in a box.

    power-cut-fs.py [--stall-create] BACKING MOUNTPOINT

Files under MOUNTPOINT are the files under BACKING. File *data* written
through the mount lives only in this process's memory until the file is
fsync'ed or fdatasync'ed; then it is written to BACKING and synced. Killing
this process (SIGKILL) is the power cut: BACKING then holds exactly the data
that was synced. Metadata (create, rename, unlink, mkdir) goes to BACKING at
once, the kinder half of a real file system after a crash: a renamed file
keeps only its synced data (the classic lost-rename-without-fsync case).
Single-threaded; direct IO, so every write reaches this process.

With --stall-create, creating a file never returns: a process that writes
one is held there (and the whole file system with it, being single-threaded)
until this process is killed, which fails the creation.
"""
import errno
import os
import stat
import sys
import time

import fusepy as fuse


class PowerCut(fuse.Operations):
    def __init__(self, backing, stall_create=False):
        self.backing = backing
        self.stall_create = stall_create
        self.volatile = {}  # path -> bytearray: the content as written, synced or not
        self.fds = {}
        self.next_fh = 1

    def _b(self, path):
        return os.path.join(self.backing, path.lstrip("/"))

    def _content(self, path):
        if path not in self.volatile:
            with open(self._b(path), "rb") as f:
                self.volatile[path] = bytearray(f.read())
        return self.volatile[path]

    def getattr(self, path, fh=None):
        try:
            st = os.lstat(self._b(path))
        except OSError as e:
            raise fuse.FuseOSError(e.errno)
        attrs = {k: getattr(st, k) for k in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size",
                                              "st_atime", "st_mtime", "st_ctime")}
        if path in self.volatile and stat.S_ISREG(st.st_mode):
            attrs["st_size"] = len(self.volatile[path])
        return attrs

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._b(path))

    def access(self, path, mode):
        if not os.access(self._b(path), mode):
            raise fuse.FuseOSError(errno.EACCES)

    def mkdir(self, path, mode):
        os.mkdir(self._b(path), mode)

    def rmdir(self, path):
        os.rmdir(self._b(path))

    def chmod(self, path, mode):
        os.chmod(self._b(path), mode)

    def chown(self, path, uid, gid):
        os.chown(self._b(path), uid, gid)

    def utimens(self, path, times=None):
        os.utime(self._b(path), times)

    def statfs(self, path):
        st = os.statvfs(self._b(path))
        return {k: getattr(st, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                                             "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")}

    def _open(self, path):
        self.next_fh += 1
        self.fds[self.next_fh] = path
        return self.next_fh

    def create(self, path, mode, fi=None):
        if self.stall_create:
            while True:
                time.sleep(3600)
        fd = os.open(self._b(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        os.close(fd)
        self.volatile[path] = bytearray()
        return self._open(path)

    def open(self, path, flags):
        if flags & os.O_TRUNC:
            self._content(path)[:] = b""
        return self._open(path)

    def read(self, path, size, offset, fh):
        return bytes(self._content(path)[offset:offset + size])

    def write(self, path, data, offset, fh):
        content = self._content(path)
        if len(content) < offset:
            content.extend(b"\0" * (offset - len(content)))
        content[offset:offset + len(data)] = data
        return len(data)

    def truncate(self, path, length, fh=None):
        content = self._content(path)
        if len(content) > length:
            del content[length:]
        else:
            content.extend(b"\0" * (length - len(content)))

    def fsync(self, path, datasync, fh):
        content = self._content(path)
        fd = os.open(self._b(path), os.O_WRONLY)
        try:
            os.ftruncate(fd, len(content))
            os.pwrite(fd, bytes(content), 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    def fsyncdir(self, path, datasync, fh):
        return 0

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        self.fds.pop(fh, None)
        return 0

    def rename(self, old, new):
        os.rename(self._b(old), self._b(new))
        # The new name holds what the old file had synced; its unsynced data goes with it
        # in memory (it is lost at the power cut, as the old name's would be).
        if old in self.volatile:
            self.volatile[new] = self.volatile.pop(old)
        else:
            self.volatile.pop(new, None)

    def unlink(self, path):
        os.unlink(self._b(path))
        self.volatile.pop(path, None)


if __name__ == "__main__":
    args = sys.argv[1:]
    stall = "--stall-create" in args
    backing, mountpoint = [a for a in args if a != "--stall-create"]
    fuse.FUSE(PowerCut(backing, stall), mountpoint, foreground=True, nothreads=True, direct_io=True)
