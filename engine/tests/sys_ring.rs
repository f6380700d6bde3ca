//! io_uring against the real kernel: READ_FIXED, RECV, POLL_ADD, and `push`
//! submitting when the submission queue is full.

use std::error::Error;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use io_uring::{opcode, types};
use ringfault_engine::sys::mapping::AlignedBuf;
use ringfault_engine::sys::ring::{Op, Ring, RingFeatures};

type TestResult = Result<(), Box<dyn Error>>;

fn socketpair() -> Result<(OwnedFd, OwnedFd), Box<dyn Error>> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: socketpair just returned these fds; we own them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn write_all(fd: &OwnedFd, data: &[u8]) -> TestResult {
    // SAFETY: `data` is readable for its length.
    let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
    if usize::try_from(n).ok() != Some(data.len()) {
        return Err(format!("short write: {n}").into());
    }
    Ok(())
}

fn need(features: &RingFeatures, ops: &[Op]) -> bool {
    for &op in ops {
        if let Err(e) = features.require(op) {
            println!("SKIP: {e}");
            return false;
        }
    }
    true
}

#[test]
fn read_fixed_and_recv_from_socketpair() -> TestResult {
    let mut ring = Ring::new(8)?;
    let features = ring.probe();
    if !need(&features, &[Op::ReadFixed, Op::Recv]) {
        return Ok(());
    }
    let (a, b) = socketpair()?;
    let mut bufs = vec![AlignedBuf::new(4096)?, AlignedBuf::new(4096)?];
    // SAFETY: `bufs` outlives the ring's use of them: both live to the end of
    // the test, after the last completion is reaped.
    unsafe { ring.register_buffers(&bufs)? };

    write_all(&a, b"fixed read")?;
    let ptr0 = bufs[0].as_mut_ptr();
    let read = opcode::ReadFixed::new(types::Fd(b.as_raw_fd()), ptr0, 4096, 0)
        .build()
        .user_data(1);
    // SAFETY: buffer 0 is registered and alive, and no slice of it is used
    // until the completion is reaped; `b` outlives the operation.
    unsafe { ring.push(read)? };
    ring.submit_and_wait(1)?;
    let done: Vec<_> = ring.completions().collect();
    assert_eq!(done, vec![(1, 10)]);
    assert_eq!(&bufs[0].as_slice()[..10], b"fixed read");

    write_all(&a, b"recv")?;
    let ptr1 = bufs[1].as_mut_ptr();
    let recv = opcode::Recv::new(types::Fd(b.as_raw_fd()), ptr1, 4096)
        .build()
        .user_data(2);
    // SAFETY: as above, for buffer 1.
    unsafe { ring.push(recv)? };
    ring.submit_and_wait(1)?;
    let done: Vec<_> = ring.completions().collect();
    assert_eq!(done, vec![(2, 4)]);
    assert_eq!(&bufs[1].as_slice()[..4], b"recv");
    ring.unregister_buffers()?;
    Ok(())
}

#[test]
fn poll_add_on_eventfd() -> TestResult {
    let mut ring = Ring::new(4)?;
    if !need(&ring.probe(), &[Op::PollAdd]) {
        return Ok(());
    }
    // SAFETY: eventfd takes two ints and touches no memory.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if efd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: eventfd just returned this fd; we own it.
    let efd = unsafe { OwnedFd::from_raw_fd(efd) };
    let poll = opcode::PollAdd::new(
        types::Fd(efd.as_raw_fd()),
        u32::from(libc::POLLIN.unsigned_abs()),
    )
    .build()
    .user_data(3);
    // SAFETY: the eventfd outlives the operation.
    unsafe { ring.push(poll)? };
    ring.submit()?;
    assert_eq!(ring.completions().count(), 0, "not readable yet");
    write_all(&efd, &1u64.to_ne_bytes())?;
    ring.submit_and_wait(1)?;
    let done: Vec<_> = ring.completions().collect();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].0, 3);
    assert_ne!(done[0].1 & i32::from(libc::POLLIN), 0);
    Ok(())
}

#[test]
fn push_submits_when_the_queue_is_full() -> TestResult {
    let mut ring = Ring::new(4)?;
    for i in 0..7u64 {
        // SAFETY: NOP names no buffer or fd.
        unsafe { ring.push(opcode::Nop::new().build().user_data(i))? };
    }
    ring.submit_and_wait(3)?;
    let mut seen: Vec<u64> = ring
        .completions()
        .map(|(u, r)| {
            assert_eq!(r, 0);
            u
        })
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..7).collect::<Vec<_>>());
    Ok(())
}

#[test]
fn probe_reports_this_kernel() -> TestResult {
    let f = RingFeatures::detect()?;
    println!("io_uring opcodes: {f:?}");
    assert!(f.nop && f.read_fixed && f.poll_add, "Linux 5.1 basics");
    Ok(())
}
