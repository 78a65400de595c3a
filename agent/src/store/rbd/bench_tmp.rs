#![allow(clippy::cast_possible_truncation)]
use super::tests::{Scratch, MIB};
use crate::store::BlockStore;
use std::sync::Arc;
use std::time::Instant;

fn run(store: &Arc<super::RbdStore>, threads: u64, bs: usize, ops: u64, write: bool) -> f64 {
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let store = store.clone();
            s.spawn(move || {
                let mut buf = vec![7u8; bs];
                for i in 0..ops {
                    let off = ((t * ops + i) * bs as u64 * 7919) % (256 * MIB - bs as u64);
                    let off = off / 4096 * 4096;
                    if write {
                        store.write_at(&buf, off).unwrap()
                    } else {
                        store.read_at(&mut buf, off).unwrap()
                    }
                }
            });
        }
    });
    (threads * ops) as f64 / t0.elapsed().as_secs_f64()
}

#[test]
fn bench_sync_io() {
    let scratch = Scratch::new();
    let (_, store) = scratch.create("rbd", "bench", 256 * MIB);
    let store = Arc::new(store);
    for (threads, bs, ops) in [(1u64, 4096usize, 2000u64), (16, 4096, 500), (1, 1 << 20, 100), (4, 1 << 20, 50)] {
        let w = run(&store, threads, bs, ops, true);
        let r = run(&store, threads, bs, ops, false);
        eprintln!(
            "threads={threads} bs={bs}: write {w:.0} IOPS ({:.1} MiB/s), read {r:.0} IOPS ({:.1} MiB/s)",
            w * bs as f64 / 1048576.0,
            r * bs as f64 / 1048576.0
        );
    }
}

fn aio_io(image: &super::image::Image, buf: &mut [u8], off: u64, write: bool) {
    use rbd_sys as sys;
    let mut c: sys::rbd_completion_t = std::ptr::null_mut();
    // SAFETY: bench only.
    unsafe {
        assert_eq!(sys::rbd_aio_create_completion(std::ptr::null_mut(), None, &mut c), 0);
        let rc = if write {
            sys::rbd_aio_write(image.raw(), off, buf.len(), buf.as_ptr().cast(), c)
        } else {
            sys::rbd_aio_read(image.raw(), off, buf.len(), buf.as_mut_ptr().cast(), c)
        };
        assert_eq!(rc, 0);
        sys::rbd_aio_wait_for_complete(c);
        let rv = sys::rbd_aio_get_return_value(c);
        assert!(rv == buf.len() as isize || (write && rv == 0), "{rv}");
        sys::rbd_aio_release(c);
    }
}

#[test]
fn bench_aio_io() {
    let scratch = Scratch::new();
    let (name, store) = scratch.create("rbd", "abench", 256 * MIB);
    drop(store);
    let ioctx = Arc::new(super::rados::IoCtx::create(&scratch_cluster(&scratch), "rbd").unwrap());
    let image = Arc::new(super::image::Image::open(&ioctx, &name, None, false).unwrap());
    for (threads, bs, ops) in [(1u64, 4096usize, 2000u64), (16, 4096, 500), (1, 1 << 20, 100), (4, 1 << 20, 50)] {
        for write in [true, false] {
            let t0 = Instant::now();
            std::thread::scope(|s| {
                for t in 0..threads {
                    let image = image.clone();
                    s.spawn(move || {
                        let mut buf = vec![7u8; bs];
                        for i in 0..ops {
                            let off = ((t * ops + i) * bs as u64 * 7919) % (256 * MIB - bs as u64) / 4096 * 4096;
                            aio_io(&image, &mut buf, off, write);
                        }
                    });
                }
            });
            let iops = (threads * ops) as f64 / t0.elapsed().as_secs_f64();
            eprintln!(
                "aio threads={threads} bs={bs} write={write}: {iops:.0} IOPS ({:.1} MiB/s)",
                iops * bs as f64 / 1048576.0
            );
        }
    }
}

fn scratch_cluster(s: &Scratch) -> Arc<super::rados::Cluster> {
    s.ceph.cluster.clone()
}
