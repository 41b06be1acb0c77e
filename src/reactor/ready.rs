//! The reactor's wait for readiness on its mio [`Poll`].
//!
//! On Linux the wait is `epoll_pwait(2)` on the poll's epoll instance, made with `syscall(2)`
//! into the reactor's own event array, instead of [`Poll::poll`]: glibc's `epoll_wait` is a
//! cancellation point, and in a process with more than one thread (the server's handler
//! pool, its signal thread) it switches asynchronous thread cancellation on before the
//! system call and off after it (about 30 instructions per wait, callgrind, S1: the same
//! reason as `transport/sys.rs`'s `recv` and `writev`), and mio converts a `Duration`
//! timeout to milliseconds through a checked addition on each call; the reactor's timeout is
//! in milliseconds already. What an event means is mio's mapping, unchanged (see
//! [`Ready`]). mio keeps no state of its own about a wait on epoll: registration,
//! deregistration and its eventfd [`Waker`](mio::Waker) work as before. Elsewhere the wait is
//! [`Poll::poll`].

use std::io;

use mio::{Poll, Token};

/// One event's readiness, as the reactor uses it: mio's `Event` accessors folded into the
/// three facts a link takes (see [`Link::handle_readiness`](crate::link::Link::handle_readiness)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Ready {
    pub(super) token: Token,
    /// mio's `is_readable`.
    pub(super) readable: bool,
    /// mio's `is_writable || is_write_closed || is_error`: a write will not block, or will
    /// fail at once.
    pub(super) writable: bool,
    /// mio's `is_read_closed || is_error`: reads go on until they report the end.
    pub(super) read_closed: bool,
}

/// Where the events of one wait land; one per reactor, reused every turn.
pub(super) struct Waiter {
    #[cfg(target_os = "linux")]
    events: Vec<libc::epoll_event>,
    #[cfg(not(target_os = "linux"))]
    events: mio::Events,
}

#[cfg(target_os = "linux")]
impl Waiter {
    /// Room for `capacity` events per wait.
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            events: Vec::with_capacity(capacity),
        }
    }

    /// Waits until `poll` has events or `timeout_ms` milliseconds have passed (0: returns at
    /// once), and keeps the events for [`iter`](Self::iter). (`poll` is `&mut` as for
    /// [`Poll::poll`], though only its descriptor is used here.)
    pub(super) fn wait(&mut self, poll: &mut Poll, timeout_ms: u32) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        self.events.clear();
        let max = libc::c_int::try_from(self.events.capacity()).unwrap_or(libc::c_int::MAX);
        let timeout = libc::c_int::try_from(timeout_ms).unwrap_or(libc::c_int::MAX);
        #[allow(unsafe_code)]
        // SAFETY: epoll_pwait(2) on the epoll instance `poll` owns (the borrow keeps it
        // open) writes at most `max` events at the array's start, which has room for
        // `capacity() >= max` of them; a null signal mask makes it epoll_wait(2) (the size
        // argument is then ignored).
        let n = unsafe {
            libc::syscall(
                libc::SYS_epoll_pwait,
                poll.as_raw_fd(),
                self.events.as_mut_ptr(),
                max,
                timeout,
                std::ptr::null::<libc::sigset_t>(),
                std::mem::size_of::<libc::sigset_t>(),
            )
        };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        #[allow(unsafe_code)]
        // SAFETY: the kernel initialised the first `n` events (`n <= max <= capacity`).
        unsafe {
            self.events.set_len(n);
        }
        Ok(())
    }

    /// The last wait's events.
    pub(super) fn iter(&self) -> impl Iterator<Item = Ready> + '_ {
        self.events.iter().map(|e| {
            // mio's mapping (`sys::unix::selector::epoll::event`), folded.
            let bits = e.events as libc::c_int;
            let has = |flag: libc::c_int| bits & flag != 0;
            let error = has(libc::EPOLLERR);
            Ready {
                token: Token(e.u64 as usize),
                readable: has(libc::EPOLLIN | libc::EPOLLPRI),
                // `is_write_closed` is HUP, OUT with ERR, or ERR alone: all within this.
                writable: has(libc::EPOLLOUT | libc::EPOLLHUP) || error,
                read_closed: has(libc::EPOLLHUP)
                    || (has(libc::EPOLLIN) && has(libc::EPOLLRDHUP))
                    || error,
            }
        })
    }
}

#[cfg(not(target_os = "linux"))]
impl Waiter {
    /// Room for `capacity` events per wait.
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            events: mio::Events::with_capacity(capacity),
        }
    }

    /// Waits until `poll` has events or `timeout_ms` milliseconds have passed (0: returns at
    /// once), and keeps the events for [`iter`](Self::iter).
    pub(super) fn wait(&mut self, poll: &mut Poll, timeout_ms: u32) -> io::Result<()> {
        let timeout = std::time::Duration::from_millis(u64::from(timeout_ms));
        poll.poll(&mut self.events, Some(timeout))
    }

    /// The last wait's events.
    pub(super) fn iter(&self) -> impl Iterator<Item = Ready> + '_ {
        self.events.iter().map(|e| Ready {
            token: e.token(),
            readable: e.is_readable(),
            writable: e.is_writable() || e.is_write_closed() || e.is_error(),
            read_closed: e.is_read_closed() || e.is_error(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::{Duration, Instant};

    use mio::net::{TcpListener, TcpStream};
    use mio::{Interest, Waker};

    use super::*;

    /// Waits until an event for `token` comes (bounded), returning it.
    fn wait_for(poll: &mut Poll, waiter: &mut Waiter, token: Token) -> Ready {
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            waiter.wait(poll, 100).unwrap();
            if let Some(r) = waiter.iter().find(|r| r.token == token) {
                return r;
            }
        }
        panic!("no event for {token:?} within 10 s");
    }

    #[test]
    fn a_wait_reports_what_mio_would() {
        let mut poll = Poll::new().unwrap();
        let mut waiter = Waiter::new(16);
        // Nothing registered: a zero timeout returns at once with nothing.
        waiter.wait(&mut poll, 0).unwrap();
        assert_eq!(waiter.iter().count(), 0);

        // The waker's event comes through with its token.
        let waker = Waker::new(poll.registry(), Token(7)).unwrap();
        waker.wake().unwrap();
        assert_eq!(wait_for(&mut poll, &mut waiter, Token(7)).token, Token(7));

        // A connected socket is writable; bytes make it readable; the peer's close, read
        // closed.
        let mut listener = TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        poll.registry()
            .register(&mut listener, Token(1), Interest::READABLE)
            .unwrap();
        assert!(wait_for(&mut poll, &mut waiter, Token(1)).readable);
        let (mut socket, _): (TcpStream, _) = listener.accept().unwrap();
        poll.registry()
            .register(
                &mut socket,
                Token(2),
                Interest::READABLE | Interest::WRITABLE,
            )
            .unwrap();
        let first = wait_for(&mut poll, &mut waiter, Token(2));
        assert!(first.writable && !first.read_closed, "{first:?}");
        client.write_all(b"x").unwrap();
        let mut r = wait_for(&mut poll, &mut waiter, Token(2));
        while !r.readable {
            r = wait_for(&mut poll, &mut waiter, Token(2));
        }
        assert!(!r.read_closed, "{r:?}");
        drop(client);
        let mut r = wait_for(&mut poll, &mut waiter, Token(2));
        while !r.read_closed {
            r = wait_for(&mut poll, &mut waiter, Token(2));
        }
        assert!(r.readable, "an end of stream is read: {r:?}");
    }
}
