//! The two system calls a message's bytes take over plain TCP, `recv` and `writev`.
//!
//! On Linux they are made with `syscall(2)` instead of glibc's wrappers. Those wrappers are
//! cancellation points: in a process with more than one thread (the server's handler pool,
//! its signal thread) each call switches asynchronous thread cancellation on before the
//! system call and off after it, about 30 instructions per call (callgrind, S1:
//! `__pthread_enable_asynccancel` and `__pthread_disable_asynccancel`), and Rust never cancels
//! a thread, so that is all they add. Elsewhere the calls go through socket2 and std as
//! usual. A tool that interposes glibc's `recv`/`writev` (`LD_PRELOAD`) does not see these
//! two calls; one that must (the power-loss test's shim) interposes `syscall` as well.

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;

use mio::net::TcpStream;

/// recv(2) into `buf`: how many bytes the kernel wrote at its start (0: end of stream).
#[cfg(target_os = "linux")]
#[inline]
pub(super) fn recv(socket: &TcpStream, buf: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    #[allow(unsafe_code)]
    // SAFETY: recvfrom(2) on a socket we own (the borrow keeps it open) writes at most
    // `buf.len()` bytes at `buf`'s start, which is valid for that many writes; the null
    // address and length pointers ask for no peer address, as recv(2) does.
    let n = unsafe {
        libc::syscall(
            libc::SYS_recvfrom,
            socket.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
            0,
            std::ptr::null_mut::<libc::sockaddr>(),
            std::ptr::null_mut::<libc::socklen_t>(),
        )
    };
    result(n)
}

/// writev(2) of `bufs`: how many bytes the socket took.
#[cfg(target_os = "linux")]
#[inline]
pub(super) fn writev(socket: &TcpStream, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    /// The kernel's limit on slices per call (`UIO_MAXIOV`); more fail with `EINVAL`.
    const MAX_IOV: usize = 1024;
    #[allow(unsafe_code)]
    // SAFETY: `IoSlice` is ABI-compatible with `struct iovec` on Unix (std's guarantee), and
    // every slice in `bufs` is valid for reads of its length for the call; writev(2) only
    // reads them, from a socket we own (the borrow keeps it open).
    let n = unsafe {
        libc::syscall(
            libc::SYS_writev,
            socket.as_raw_fd(),
            bufs.as_ptr().cast::<libc::iovec>(),
            bufs.len().min(MAX_IOV),
        )
    };
    result(n)
}

/// A system call's return value as `io::Result` (-1: the error in `errno`).
#[cfg(target_os = "linux")]
#[inline]
fn result(n: libc::c_long) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// recv(2) into `buf`: how many bytes the kernel wrote at its start (0: end of stream).
#[cfg(not(target_os = "linux"))]
pub(super) fn recv(socket: &TcpStream, buf: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
    socket2::SockRef::from(socket).recv(buf)
}

/// writev(2) of `bufs`: how many bytes the socket took.
#[cfg(not(target_os = "linux"))]
pub(super) fn writev(socket: &TcpStream, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    use std::io::Write;
    let mut socket = socket;
    socket.write_vectored(bufs)
}
