#![allow(clippy::cast_possible_truncation)] // small test values

use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;
use crate::config::BitmapConfig;
use crate::store::Identity;

const SIZE: u64 = 8 << 20;

fn identity() -> Identity {
    Identity { id: "test:1".into(), modified_ns: 42 }
}

/// Opens with exact write intent (`intent_region: 0`).
fn open(dir: &std::path::Path, configured: &[(&str, u64)]) -> DiskBitmaps {
    open_with(dir, configured, 0)
}

fn open_with(dir: &std::path::Path, configured: &[(&str, u64)], intent_region: u64) -> DiskBitmaps {
    let configured: Vec<BitmapConfig> =
        configured.iter().map(|(n, g)| BitmapConfig::new(n, *g, true).unwrap()).collect();
    DiskBitmaps::open(dir, "vm/disk", SIZE, identity(), &configured, intent_region).unwrap()
}

/// Dirty byte ranges of a bitmap, as a set of granule-aligned offsets.
fn dirty(b: &DiskBitmaps, name: &str) -> Vec<(u64, u64)> {
    let bm = b.get(name).unwrap();
    let mut pos = 0;
    let mut out = Vec::new();
    for (len, d) in bm.extents(0, SIZE) {
        if d {
            out.push((pos, len));
        }
        pos += len;
    }
    out
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, u64),
    Clear(usize),
    Merge(usize, usize),
    Enable(usize, bool),
    Reopen,
    Checkpoint,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..SIZE, 1u64..300_000).prop_map(|(o, l)| Op::Write(o, l.min(SIZE - o))),
        1 => (0usize..2).prop_map(Op::Clear),
        1 => (0usize..2, 0usize..2).prop_map(|(a, b)| Op::Merge(a, b)),
        1 => (0usize..2, any::<bool>()).prop_map(|(a, e)| Op::Enable(a, e)),
        1 => Just(Op::Reopen),
        1 => Just(Op::Checkpoint),
    ]
}

/// Naive model: the set of dirty granules per bitmap.
struct Model {
    gran: [u64; 2],
    dirty: [BTreeSet<u64>; 2],
    enabled: [bool; 2],
}

impl Model {
    fn ranges(&self, i: usize) -> Vec<(u64, u64)> {
        let g = self.gran[i];
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &k in &self.dirty[i] {
            let (s, e) = (k * g, ((k + 1) * g).min(SIZE));
            match out.last_mut() {
                Some(last) if last.0 + last.1 == s => last.1 += e - s,
                _ => out.push((s, e - s)),
            }
        }
        out
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn bitmaps_match_a_naive_model(ops in proptest::collection::vec(op(), 1..40), region in prop_oneof![Just(0), Just(1 << 20)]) {
        let dir = tempfile::tempdir().unwrap();
        let names = ["a", "b"];
        let mut disk = open_with(dir.path(), &[("a", 65536), ("b", 4096)], region);
        let mut m = Model { gran: [65536, 4096], dirty: [BTreeSet::new(), BTreeSet::new()], enabled: [true, true] };
        for op in ops {
            match op {
                Op::Write(o, l) => {
                    disk.mark(o, l).unwrap();
                    for i in 0..2 {
                        if m.enabled[i] {
                            m.dirty[i].extend(o / m.gran[i]..=(o + l - 1) / m.gran[i]);
                        }
                    }
                }
                Op::Clear(i) => {
                    disk.clear(names[i]).unwrap();
                    m.dirty[i].clear();
                }
                Op::Merge(t, s) => {
                    disk.merge(names[t], &[names[s].to_string()]).unwrap();
                    let g = m.gran[t];
                    let add: Vec<u64> = m.dirty[s].iter().flat_map(|&k| {
                        let (start, end) = (k * m.gran[s], ((k + 1) * m.gran[s]).min(SIZE));
                        start / g..=(end - 1) / g
                    }).collect();
                    m.dirty[t].extend(add);
                }
                Op::Enable(i, e) => {
                    disk.set_enabled(names[i], e).unwrap();
                    m.enabled[i] = e;
                }
                Op::Reopen => {
                    disk.close(&identity());
                    drop(disk);
                    disk = open_with(dir.path(), &[], region);
                }
                Op::Checkpoint => disk.checkpoint(),
            }
            for (i, name) in names.iter().enumerate() {
                prop_assert_eq!(dirty(&disk, name), m.ranges(i), "bitmap {}", name);
                prop_assert!(disk.get(name).unwrap().is_consistent());
            }
        }
    }
}

#[test]
fn an_unclean_stop_keeps_every_marked_bit() {
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path(), &[("a", 65536)]);
    let writes = [(0u64, 4096u64), (1 << 20, 1), (SIZE - 1, 1), (3 << 20, 200_000)];
    for (o, l) in writes {
        disk.mark(o, l).unwrap();
    }
    let before = dirty(&disk, "a");
    drop(disk); // no close(): as after kill -9, only what mark() made durable is on disk
    let disk = open(dir.path(), &[]);
    assert!(disk.get("a").unwrap().is_consistent());
    assert_eq!(dirty(&disk, "a"), before);
}

#[test]
fn generation_bumps_when_the_bitmap_stops_being_a_complete_record() {
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path(), &[("a", 65536), ("b", 65536)]);
    let g0 = disk.get("a").unwrap().generation();
    disk.mark(0, 4096).unwrap();
    disk.set_enabled("a", true).unwrap();
    assert_eq!(disk.get("a").unwrap().generation(), g0, "enabling an enabled bitmap changes nothing");
    disk.set_enabled("a", false).unwrap();
    assert_eq!(disk.get("a").unwrap().generation(), g0 + 1, "a disabled bitmap misses writes");
    disk.set_enabled("a", true).unwrap();
    assert_eq!(disk.get("a").unwrap().generation(), g0 + 2, "re-enabled: still missed the writes in between");
    disk.clear("a").unwrap();
    assert_eq!(disk.get("a").unwrap().generation(), g0 + 3);
    disk.merge("a", &["b".into()]).unwrap();
    assert_eq!(disk.get("a").unwrap().generation(), g0 + 4);
    disk.close(&identity());
    drop(disk);
    assert_eq!(open(dir.path(), &[]).get("a").unwrap().generation(), g0 + 4);
}

#[test]
fn untrusted_files_load_inconsistent_and_can_only_be_removed() {
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path(), &[("a", 65536), ("b", 65536)]);
    disk.close(&identity());
    drop(disk);
    let path = dir.path().join("a.bitmap");
    std::fs::write(&path, b"garbage").unwrap();
    let disk = open(dir.path(), &[]);
    let a = disk.list().into_iter().find(|b| b.name == "a").unwrap();
    assert!(!a.consistent);
    assert!(a.inconsistent_reason.as_deref().unwrap().contains("truncated"), "{a:?}");
    assert!(matches!(disk.clear("a"), Err(BitmapError::Inconsistent { .. })));
    assert!(matches!(disk.merge("b", &["a".into()]), Err(BitmapError::Inconsistent { .. })));
    assert!(matches!(disk.drained(|d| disk.begin_job(d, "a", "j1")), Err(BitmapError::Inconsistent { .. })));
    assert!(disk.get("b").unwrap().is_consistent(), "other bitmaps are not affected");
    disk.remove("a").unwrap();
    assert!(!path.exists());
    disk.add("a", 65536, true).unwrap();
    assert!(disk.get("a").unwrap().is_consistent());
}

#[test]
fn a_changed_image_makes_bitmaps_inconsistent() {
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path(), &[("a", 65536)]);
    disk.close(&identity());
    drop(disk);
    // Clean stop recorded mtime 42; the image now has another mtime.
    let moved = Identity { id: "test:1".into(), modified_ns: 43 };
    let disk = DiskBitmaps::open(dir.path(), "vm/disk", SIZE, moved, &[], 0).unwrap();
    let reason = disk.list()[0].inconsistent_reason.clone().unwrap();
    assert!(reason.contains("modified while the agent was not running"), "{reason}");
    drop(disk);
    let other = Identity { id: "test:2".into(), modified_ns: 42 };
    let disk = DiskBitmaps::open(dir.path(), "vm/disk", SIZE, other, &[], 0).unwrap();
    assert!(disk.list()[0].inconsistent_reason.clone().unwrap().contains("image replaced"));
    drop(disk);
    let disk = DiskBitmaps::open(dir.path(), "vm/disk", SIZE * 2, identity(), &[], 0).unwrap();
    assert!(disk.list()[0].inconsistent_reason.clone().unwrap().contains("disk size changed"));
}

#[test]
fn a_suspect_set_that_cannot_be_saved_still_lets_the_clean_stop_be_recorded() {
    // The clean header carries the image's mtime, which catches an image written while the
    // agent was down; a failure to save the suspect hint must not cost that check.
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path(), &[("a", 65536)]);
    std::fs::create_dir_all(dir.path().join("a.suspect/in-the-way")).unwrap();
    disk.close(&identity());
    drop(disk);
    let moved = Identity { id: "test:1".into(), modified_ns: 43 };
    let disk = DiskBitmaps::open(dir.path(), "vm/disk", SIZE, moved, &[], 0).unwrap();
    let reason = disk.list()[0].inconsistent_reason.clone().unwrap_or_default();
    assert!(reason.contains("modified while the agent was not running"), "{:?}", disk.list());
}

#[test]
fn job_commit_keeps_writes_made_during_the_job_and_abort_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path(), &[("a", 65536)]);
    disk.mark(0, 65536).unwrap();
    disk.mark(1 << 20, 65536).unwrap();
    let frozen = disk.drained(|d| disk.begin_job(d, "a", "job-1")).unwrap();
    assert!(matches!(disk.clear("a"), Err(BitmapError::Busy { .. })));
    assert!(matches!(disk.remove("a"), Err(BitmapError::Busy { .. })));
    disk.mark(1 << 20, 4096).unwrap(); // rewritten during the job: stays dirty
    disk.mark(2 << 20, 4096).unwrap(); // new during the job: stays dirty
    let g = disk.drained(|d| disk.commit_job(d, "a", &frozen)).unwrap();
    assert_eq!(g, frozen.generation + 1);
    assert_eq!(dirty(&disk, "a"), vec![(1 << 20, 65536), (2 << 20, 65536)]);
    let frozen = disk.drained(|d| disk.begin_job(d, "a", "job-2")).unwrap();
    disk.mark(5 << 20, 1).unwrap();
    disk.abort_job("a", "job-2");
    assert_eq!(dirty(&disk, "a"), vec![(1 << 20, 65536), (2 << 20, 65536), (5 << 20, 65536)]);
    assert_eq!(disk.get("a").unwrap().generation(), frozen.generation);
    assert!(!disk.list()[0].busy);
}

#[test]
fn bad_requests_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path(), &[("a", 65536)]);
    assert!(matches!(disk.add("a", 65536, true), Err(BitmapError::Exists(_))));
    assert!(matches!(disk.add("x", 3000, true), Err(BitmapError::Invalid(_))));
    assert!(matches!(disk.add("x", 128 << 20, true), Err(BitmapError::Invalid(_))));
    assert!(matches!(disk.add("../x", 65536, true), Err(BitmapError::Invalid(_))));
    assert!(matches!(disk.clear("nope"), Err(BitmapError::NotFound { .. })));
    assert!(matches!(disk.merge("a", &["nope".into()]), Err(BitmapError::NotFound { .. })));
    assert_eq!(disk.list().len(), 1);
}

const REGION: u64 = 1 << 20;

/// Granules of `g` bytes covering whole `REGION`s touched by `writes`.
fn regions_of(writes: &[(u64, u64)], g: u64) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for &(o, l) in writes {
        for r in o / REGION..=(o + l - 1) / REGION {
            out.extend(r * REGION / g..((r + 1) * REGION).min(SIZE).div_ceil(g));
        }
    }
    out
}

fn granule_set(ranges: &[(u64, u64)], g: u64) -> BTreeSet<u64> {
    ranges.iter().flat_map(|&(o, l)| o / g..(o + l).div_ceil(g)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// With a write-intent log, a crash (no close) loads a superset of every
    /// marked granule, and the extra bits lie in regions written since the
    /// checkpoint before last (older regions were cleared once cold).
    #[test]
    fn an_unclean_stop_with_intent_loads_exact_bits_plus_recent_regions(
        rounds in proptest::collection::vec(proptest::collection::vec((0..SIZE, 1u64..200_000), 0..12), 1..5),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let disk = open_with(dir.path(), &[("a", 65536), ("b", 4096)], REGION);
        let mut all = Vec::new();
        let mut recent: Vec<Vec<(u64, u64)>> = Vec::new();
        for writes in rounds {
            let writes: Vec<(u64, u64)> = writes.into_iter().map(|(o, l)| (o, l.min(SIZE - o))).collect();
            for &(o, l) in &writes {
                disk.mark(o, l).unwrap();
            }
            all.extend(writes.iter().copied());
            recent.push(writes);
            disk.checkpoint();
        }
        let exact = [dirty(&disk, "a"), dirty(&disk, "b")];
        drop(disk); // as after kill -9
        let disk = open_with(dir.path(), &[], REGION);
        let since: Vec<(u64, u64)> = recent.iter().rev().take(2).flatten().copied().collect();
        for (i, (name, g)) in [("a", 65536u64), ("b", 4096)].into_iter().enumerate() {
            prop_assert!(disk.get(name).unwrap().is_consistent());
            let loaded = granule_set(&dirty(&disk, name), g);
            let marked = granule_set(&exact[i], g);
            prop_assert!(marked.is_subset(&loaded), "{}: a marked granule was lost", name);
            let allowed: BTreeSet<u64> = marked.union(&regions_of(&since, g)).copied().collect();
            prop_assert!(loaded.is_subset(&allowed), "{}: extra bits outside recent regions", name);
            prop_assert_eq!(&marked, &granule_set(&all.iter().flat_map(|&(o, l)| [(o / g * g, (o + l).div_ceil(g) * g - o / g * g)]).collect::<Vec<_>>(), g));
        }
    }
}

#[test]
fn intent_regions_cover_first_writes_and_clear_once_cold() {
    let dir = tempfile::tempdir().unwrap();
    let disk = open_with(dir.path(), &[("a", 65536)], REGION);
    disk.mark(0, 4096).unwrap();
    // Region 0 is durable in the log: another first write there is covered without a sync.
    assert!(disk.all_durable(512 << 10, 4096));
    assert!(!disk.all_durable(3 * REGION, 4096));
    disk.checkpoint(); // writes bitmap pages; region 0 was hot, stays
    disk.checkpoint(); // cold now: cleared
    disk.mark(3 * REGION + 5, 1).unwrap();
    drop(disk);
    let disk = open_with(dir.path(), &[], REGION);
    assert_eq!(dirty(&disk, "a"), vec![(0, 65536), (3 * REGION, REGION)], "region 3 was still logged");
    disk.close(&identity());
    assert!(!dir.path().join(".write-intent").exists(), "a clean stop removes the log");
    drop(disk);
    let disk = open_with(dir.path(), &[], 0);
    assert_eq!(dirty(&disk, "a"), vec![(0, 65536), (3 * REGION, REGION)], "exact after a clean stop");
}

#[test]
fn switching_intent_off_after_a_crash_still_applies_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let disk = open_with(dir.path(), &[("a", 65536)], REGION);
    disk.mark(2 * REGION, 4096).unwrap();
    drop(disk);
    let disk = open_with(dir.path(), &[], 0);
    assert_eq!(dirty(&disk, "a"), vec![(2 * REGION, REGION)]);
    assert!(!dir.path().join(".write-intent").exists());
    drop(disk);
    assert_eq!(dirty(&open_with(dir.path(), &[], 0), "a"), vec![(2 * REGION, REGION)], "made durable in the file");
}

#[test]
fn an_unreadable_intent_log_distrusts_bitmaps_that_were_not_closed_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let disk = open_with(dir.path(), &[("a", 65536)], REGION);
    disk.mark(0, 4096).unwrap();
    drop(disk);
    std::fs::write(dir.path().join(".write-intent"), b"garbage").unwrap();
    let disk = open_with(dir.path(), &[("b", 65536)], REGION);
    let a = disk.list().into_iter().find(|b| b.name == "a").unwrap();
    assert!(!a.consistent);
    assert!(a.inconsistent_reason.as_deref().unwrap().contains("write-intent log unreadable"), "{a:?}");
    disk.close(&identity());
    drop(disk);
    // A clean stop needs no log: a garbage log next to cleanly closed bitmaps harms nothing.
    std::fs::write(dir.path().join(".write-intent"), b"garbage").unwrap();
    let disk = open_with(dir.path(), &[], REGION);
    assert!(disk.get("b").unwrap().is_consistent());
}

/// A `clear` drops a bit while a writeback of its page is between its two reads of the word (the
/// writeback read it set, then writes it clear). `persisted` must not keep claiming that bit: a
/// write there would then be acknowledged with no sync while the file lacks its bit, and a crash
/// before the next writeback would lose it (with the generation still matching the chain).
#[test]
fn a_clear_during_a_writeback_leaves_no_bit_counted_durable_that_the_file_lacks() {
    use std::sync::mpsc::channel;
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path(), &[("race6", 65536)]);
    disk.mark(0, 4096).unwrap();
    let bitmap = disk.get("race6").unwrap();
    let (reached, between) = channel();
    let (go, resume) = channel::<()>();
    crate::testkit::set("bitmap.write_pages.between_reads", "race6", move || {
        reached.send(()).unwrap();
        resume.recv().unwrap();
    });
    let writeback = std::sync::Arc::new(std::sync::Mutex::new(None));
    let (b, w) = (bitmap.clone(), writeback.clone());
    crate::testkit::set("bitmap.clear.after_bump", "race6", move || {
        *w.lock().unwrap() = Some(std::thread::spawn(move || b.write_pages(&BTreeSet::from([0])).unwrap()));
        between.recv().unwrap();
    });
    disk.clear("race6").unwrap();
    go.send(()).unwrap();
    writeback.lock().unwrap().take().unwrap().join().unwrap();
    let (_, _, body) = persist::BitmapFile::open(&dir.path().join("race6.bitmap")).unwrap();
    let claimed = bitmap.persisted.word(0) & !body[0];
    assert_eq!(claimed, 0, "persisted claims bits {claimed:#x} that the bitmap file lacks");
}

/// After a power loss the unlink of a removed bitmap's file may be lost. What the file then
/// holds (here: seen through a second link) must not match a backup chain taken against it.
#[test]
fn a_removed_bitmap_whose_file_comes_back_no_longer_matches_its_chain() {
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path(), &[("gone", 65536)]);
    disk.mark(0, 4096).unwrap();
    let generation = disk.get("gone").unwrap().generation();
    let survivor = dir.path().join("survivor");
    std::fs::hard_link(dir.path().join("gone.bitmap"), &survivor).unwrap();
    disk.remove("gone").unwrap();
    assert!(!dir.path().join("gone.bitmap").exists());
    let (_, header, _) = persist::BitmapFile::open(&survivor).unwrap();
    assert!(header.generation > generation, "the removed file still claims generation {}", header.generation);
}

/// A write that marks after the disk's bitmaps were closed (a connection that outlived the
/// shutdown's wait) must not wait forever for a writeback thread that is gone, nor leave a
/// bitmap that looks complete without its bit.
#[test]
fn a_mark_after_close_returns_and_leaves_no_consistent_bitmap_without_its_bit() {
    let dir = tempfile::tempdir().unwrap();
    let disk = std::sync::Arc::new(open(dir.path(), &[("late", 65536)]));
    disk.close(&identity());
    let (tx, rx) = std::sync::mpsc::channel();
    let d = disk.clone();
    std::thread::spawn(move || tx.send(d.mark(3 << 20, 4096).map_err(|e| e.to_string())).unwrap());
    let marked = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("mark() after close() hangs");
    drop(disk);
    let disk = open(dir.path(), &[]);
    let b = disk.get("late").unwrap();
    let has_bit = dirty(&disk, "late").iter().any(|&(o, l)| o <= 3 << 20 && (3 << 20) < o + l);
    assert!(!b.is_consistent() || has_bit, "bitmap loads consistent without the late write's bit ({marked:?})");
}

/// As above with the write-intent log (the default): a late write into a region the log held
/// needs no sync, but the log is gone after close.
#[test]
fn a_mark_after_close_with_intent_leaves_no_consistent_bitmap_without_its_bit() {
    let dir = tempfile::tempdir().unwrap();
    let disk = open_with(dir.path(), &[("late", 65536)], 1 << 20);
    disk.mark(3 << 20, 4096).unwrap();
    disk.close(&identity());
    let late = (3 << 20) + (128 << 10);
    disk.mark(late, 4096).unwrap();
    drop(disk);
    let disk = open_with(dir.path(), &[], 1 << 20);
    let b = disk.get("late").unwrap();
    let has_bit = dirty(&disk, "late").iter().any(|&(o, l)| o <= late && late < o + l);
    assert!(!b.is_consistent() || has_bit, "bitmap loads consistent without the late write's bit");
}

/// Dirty byte ranges of a bitmap over a disk of `size` bytes.
fn dirty_in(b: &DiskBitmaps, name: &str, size: u64) -> Vec<(u64, u64)> {
    let mut pos = 0;
    let mut out = Vec::new();
    for (len, d) in b.get(name).unwrap().extents(0, size) {
        if d {
            out.push((pos, len));
        }
        pos += len;
    }
    out
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
}

/// Online resize: every bit stays, the grown range starts clean, writes past the old end are
/// recorded (in the job's successor too), durably, and the files load at the new size.
#[test]
fn growing_keeps_every_bit_and_records_writes_past_the_old_end() {
    const GROWN: u64 = SIZE * 2 + 3 * 512;
    for region in [0, 1 << 20] {
        let dir = tempfile::tempdir().unwrap();
        let disk = open_with(dir.path(), &[("a", 65536), ("b", 1 << 20)], region);
        disk.mark(0, 4096).unwrap();
        disk.mark(SIZE - 1, 1).unwrap();
        let frozen = disk.drained(|d| disk.begin_job(d, "a", "job-1")).unwrap();
        disk.mark(3 << 20, 100).unwrap();
        disk.mark(0, 1).unwrap(); // frozen, and written again before the grow: in the successor
        let mut grew = false;
        disk.grow(GROWN, || -> Result<(), BitmapError> {
            grew = true;
            Ok(())
        })
        .unwrap();
        assert!(grew && disk.size() == GROWN);
        for (o, l) in [(SIZE, 1), (GROWN - 1, 1), (SIZE + (5 << 20), 70_000)] {
            disk.mark(o, l).unwrap();
        }
        let a = vec![
            (0, 65536),
            (3 << 20, 65536),
            (SIZE - 65536, 2 * 65536),
            (SIZE + (5 << 20), 2 * 65536),
            (GROWN - 512 * 3, 512 * 3),
        ];
        assert_eq!(dirty_in(&disk, "a", GROWN), a, "intent region {region}");
        let b = vec![(0, 1 << 20), (3 << 20, 1 << 20), (SIZE - (1 << 20), 2 << 20), (SIZE + (5 << 20), 1 << 20)];
        let b = [b, vec![(GROWN - 512 * 3, 512 * 3)]].concat();
        assert_eq!(dirty_in(&disk, "b", GROWN), b);
        // The job froze the old bits; what it did not see stays dirty after its commit.
        disk.drained(|d| disk.commit_job(d, "a", &frozen)).unwrap();
        let after = vec![
            (0, 65536),
            (3 << 20, 65536),
            (SIZE, 65536),
            (SIZE + (5 << 20), 2 * 65536),
            (GROWN - 512 * 3, 512 * 3),
        ];
        assert_eq!(dirty_in(&disk, "a", GROWN), after);
        assert!(matches!(disk.grow(SIZE, || Ok::<(), BitmapError>(())), Err(BitmapError::Invalid(_))));
        // After kill -9 (no close) the files load at the new size with every bit (plus, with
        // a write-intent log, the regions written since).
        drop(disk);
        let disk = DiskBitmaps::open(dir.path(), "vm/disk", GROWN, identity(), &[], region).unwrap();
        assert!(disk.list().iter().all(|b| b.consistent), "{:?}", disk.list());
        for (name, g, want) in [("a", 65536, &after), ("b", 1 << 20, &b)] {
            let (loaded, want) = (granule_set(&dirty_in(&disk, name, GROWN), g), granule_set(want, g));
            assert!(loaded.is_superset(&want), "{name}: {loaded:?} lacks some of {want:?}");
            if region == 0 {
                assert_eq!(loaded, want, "{name}");
            }
        }
    }
}

/// A crash in the middle of a grow loads bitmaps that still hold every acknowledged write
/// (none past the old end can have been acknowledged yet): before the image grew at the old
/// size, after it at the new one.
#[test]
fn a_crash_during_a_grow_loads_a_superset() {
    const GROWN: u64 = SIZE + (4 << 20);
    for (point, store_size) in [("bitmap.grow.before_store", SIZE), ("bitmap.grow.after_store", GROWN)] {
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskBitmaps::open(
            dir.path(),
            "vm/crash",
            SIZE,
            identity(),
            &[BitmapConfig::new("a", 65536, true).unwrap()],
            1 << 20,
        )
        .unwrap();
        disk.mark(1 << 20, 4096).unwrap();
        let crashed = tempfile::tempdir().unwrap();
        let to = crashed.path().to_owned();
        let from = dir.path().to_owned();
        crate::testkit::set(point, "vm/crash", move || copy_dir(&from, &to));
        disk.grow(GROWN, || Ok::<(), BitmapError>(())).unwrap();
        let loaded = DiskBitmaps::open(crashed.path(), "vm/crash", store_size, identity(), &[], 1 << 20).unwrap();
        assert!(loaded.get("a").unwrap().is_consistent(), "{point}: {:?}", loaded.list());
        assert_eq!(loaded.size(), store_size);
        let got = granule_set(&dirty_in(&loaded, "a", store_size), 65536);
        assert!(got.is_superset(&granule_set(&[(1 << 20, 65536)], 65536)), "{point}: {got:?}");
        // Nothing beyond the write's intent region (1 MiB).
        assert!(got.is_subset(&granule_set(&[(1 << 20, 1 << 20)], 65536)), "{point}: {got:?}");
    }
}

/// A failed image grow leaves the bitmaps as they were, at the old size.
#[test]
fn a_failed_store_grow_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path(), &[("a", 65536)]);
    disk.mark(0, 1).unwrap();
    let failed = disk.grow(SIZE * 2, || Err(BitmapError::Invalid("no space".into())));
    assert!(matches!(failed, Err(BitmapError::Invalid(m)) if m == "no space"));
    assert_eq!(disk.size(), SIZE);
    disk.mark(SIZE - 1, 1).unwrap();
    assert_eq!(dirty(&disk, "a"), vec![(0, 65536), (SIZE - 65536, 65536)]);
    drop(disk);
    let disk = open(dir.path(), &[]);
    assert!(disk.get("a").unwrap().is_consistent());
    assert_eq!(dirty(&disk, "a"), vec![(0, 65536), (SIZE - 65536, 65536)]);
}

/// A grow whose header write failed leaves the old size in the header over the longer body;
/// writes past the old end put their bits in that body. After a crash they are all there.
#[test]
fn bits_past_a_header_that_kept_the_old_size_load_after_a_crash() {
    const GROWN: u64 = SIZE * 2;
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path(), &[("a", 65536)]);
    disk.grow(GROWN, || Ok::<(), BitmapError>(())).unwrap();
    disk.mark(SIZE + (1 << 20), 4096).unwrap(); // durable in the body (intent_region 0)
    drop(disk); // kill -9
                // As if the header write of the grow had failed: the old size, unclean.
    let path = dir.path().join("a.bitmap");
    let (mut file, mut header, _) = persist::BitmapFile::open(&path).unwrap();
    header.disk_size = SIZE;
    file.write_header(&header).unwrap();
    drop(file);
    let disk = DiskBitmaps::open(dir.path(), "vm/disk", GROWN, identity(), &[], 0).unwrap();
    assert!(disk.get("a").unwrap().is_consistent(), "{:?}", disk.list());
    assert_eq!(dirty_in(&disk, "a", GROWN), vec![(SIZE + (1 << 20), 65536)]);
    // Past the end of the bitmaps a write fails rather than losing its bits.
    assert!(matches!(disk.mark(GROWN - 1, 2), Err(BitmapError::Invalid(_))));
}
