//! Model-based test of datastore files: two hosts, each on its own handle of one image,
//! run random writes, write_zeroes, discards, grows and flushes on their own files at the
//! same time, against an in-memory model of bytes and of each 4 KiB sub-block's extent
//! kind. Reads, block status and allocated bytes must match the model; the files must
//! read back the same after close; `check` must find nothing; deleting gives the space
//! back.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use datastore::files::{self, Session};
use datastore::hostlease::HostLease;
use datastore::{check, Datastore, LockMode, Profile};
use diskfmt::{BlockDev, ExtentKind, Provisioning, WriteFlags};
use proptest::prelude::*;

const MIB: u64 = 1 << 20;
const SUB: u64 = 4096;

struct Env {
    _dir: tempfile::TempDir,
    image: PathBuf,
    hosts: Vec<(HostLease, Arc<Session>)>,
    rt: tokio::runtime::Runtime,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("lun.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(600 << 20)
            .unwrap();
        let dev = datastore::device::Device::open(&image).unwrap();
        Datastore::format(&dev, dev.size(), "model", 4, Profile::Test).unwrap();
        let joins: Vec<_> = ["ha", "hb"]
            .into_iter()
            .map(|n| {
                let image = image.clone();
                std::thread::spawn(move || {
                    let ds = Arc::new(Datastore::open(&image).unwrap());
                    let lease = HostLease::join(Arc::clone(&ds), n, "", Box::new(|_| {})).unwrap();
                    let s = Session::start(ds, lease.owner()).unwrap();
                    (lease, s)
                })
            })
            .collect();
        let hosts = joins.into_iter().map(|j| j.join().unwrap()).collect();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        Env {
            _dir: dir,
            image,
            hosts,
            rt,
        }
    })
}

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, byte: u8 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    Grow { by: u64 },
    Flush,
    Check,
}

fn op() -> impl Strategy<Value = Op> {
    // Offsets and lengths in fractions of the file, 512-byte granular, often 4 KiB or
    // 1 MiB aligned, so edges land inside and on sub-blocks and blocks.
    let pos = prop_oneof![
        (0u64..4096).prop_map(|x| x * 512),
        (0u64..512).prop_map(|x| x * SUB),
        (0u64..8).prop_map(|x| x * MIB),
    ];
    let len = prop_oneof![
        (1u64..64).prop_map(|x| x * 512),
        (1u64..64).prop_map(|x| x * SUB),
        (1u64..3).prop_map(|x| x * MIB),
    ];
    prop_oneof![
        5 => (pos.clone(), len.clone(), 1u8..255).prop_map(|(off, len, byte)| Op::Write { off, len, byte }),
        2 => (pos.clone(), len.clone(), any::<bool>()).prop_map(|(off, len, unmap)| Op::Zero { off, len, unmap }),
        1 => (pos, len).prop_map(|(off, len)| Op::Discard { off, len }),
        1 => (0u64..3).prop_map(|x| Op::Grow { by: x * MIB + 512 * (x % 2) * 8 }),
        1 => Just(Op::Flush),
        1 => Just(Op::Check),
    ]
}

/// The model of one file.
struct Model {
    prov: Provisioning,
    bytes: Vec<u8>,
    /// Per 4 KiB sub-block: 0 hole, 1 zero, 2 data.
    kind: Vec<u8>,
}

impl Model {
    fn new(prov: Provisioning, size: u64) -> Model {
        let mut m = Model {
            prov,
            bytes: Vec::new(),
            kind: Vec::new(),
        };
        m.grow(size);
        m
    }
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn subs(size: u64) -> usize {
        size.div_ceil(MIB) as usize * 256
    }
    fn grow(&mut self, size: u64) {
        let fill = if self.prov == Provisioning::Thin {
            0
        } else {
            1
        };
        self.bytes.resize(size as usize, 0);
        self.kind.resize(Self::subs(size), fill);
    }
    fn write(&mut self, off: u64, data: &[u8]) {
        self.bytes[off as usize..off as usize + data.len()].copy_from_slice(data);
        let (s0, s1) = (off / SUB, (off + data.len() as u64).div_ceil(SUB));
        for s in s0..s1 {
            let block = s as usize / 256 * 256;
            if self.kind[block..block + 256].iter().all(|k| *k == 0) {
                self.kind[block..block + 256].fill(1); // allocated with the block
            }
            self.kind[s as usize] = 2;
        }
    }
    fn zero(&mut self, off: u64, len: u64, unmap: bool) {
        self.bytes[off as usize..(off + len) as usize].fill(0);
        let end = off + len;
        for s in off / SUB..end.div_ceil(SUB) {
            if s * SUB >= off && (s + 1) * SUB <= end && self.kind[s as usize] != 0 {
                self.kind[s as usize] = 1;
            }
        }
        if self.prov == Provisioning::Thin && unmap {
            for b in off / MIB..end.div_ceil(MIB) {
                let r = b as usize * 256..b as usize * 256 + 256;
                if self.kind[r.clone()].iter().all(|k| *k != 2) {
                    self.kind[r].fill(0);
                }
            }
        }
    }
    fn allocated(&self) -> u64 {
        self.kind.chunks(256).filter(|c| c[0] != 0).count() as u64 * MIB
    }
}

async fn verify(f: &dyn BlockDev, m: &Model) -> Result<(), String> {
    let size = m.size();
    if f.size() != size {
        return Err(format!("size {} vs model {size}", f.size()));
    }
    let mut buf = vec![0u8; size as usize];
    f.read(0, &mut buf).await.map_err(|e| e.to_string())?;
    if let Some(i) = buf.iter().zip(&m.bytes).position(|(a, b)| a != b) {
        return Err(format!("byte {i}: {} vs model {}", buf[i], m.bytes[i]));
    }
    let mut pos = 0;
    while pos < size {
        for e in f
            .block_status(pos, size - pos)
            .await
            .map_err(|e| e.to_string())?
        {
            let want = |o: u64| match m.kind[(o / SUB) as usize] {
                0 => ExtentKind::Hole,
                1 => ExtentKind::Zero,
                _ => ExtentKind::Data,
            };
            let mut o = e.offset;
            while o < e.end() {
                if want(o) != e.kind {
                    return Err(format!(
                        "block status at {o}: {:?} vs model {:?}",
                        e.kind,
                        want(o)
                    ));
                }
                o = (o / SUB + 1) * SUB;
            }
            pos = e.end();
        }
    }
    Ok(())
}

async fn run_host(
    s: Arc<Session>,
    name: String,
    prov: Provisioning,
    size: u64,
    ops: Vec<Op>,
) -> Result<(), String> {
    let e = |e: datastore::Error| e.to_string();
    let f = s.create(&name, size, prov).await.map_err(e)?;
    let mut m = Model::new(prov, size);
    for op in ops {
        match op {
            Op::Write { off, len, byte } => {
                let (off, len) = clamp(off, len, m.size());
                if len == 0 {
                    continue;
                }
                let data: Vec<u8> = (0..len).map(|i| byte.wrapping_add(i as u8)).collect();
                f.write(off, &data, WriteFlags::NONE)
                    .await
                    .map_err(|e| e.to_string())?;
                m.write(off, &data);
            }
            Op::Zero { off, len, unmap } => {
                let (off, len) = clamp(off, len, m.size());
                f.write_zeroes(off, len, unmap)
                    .await
                    .map_err(|e| e.to_string())?;
                m.zero(off, len, unmap);
            }
            Op::Discard { off, len } => {
                let (off, len) = clamp(off, len, m.size());
                f.discard(off, len).await.map_err(|e| e.to_string())?;
                m.zero(off, len, true);
            }
            Op::Grow { by } => {
                f.grow(m.size() + by).await.map_err(e)?;
                m.grow(m.size() + by);
            }
            Op::Flush => f.flush().await.map_err(|e| e.to_string())?,
            Op::Check => verify(&f, &m).await?,
        }
    }
    verify(&f, &m).await?;
    f.flush().await.map_err(|e| e.to_string())?;
    let st = files::stat(s.datastore(), &name).map_err(e)?;
    if st.allocated_bytes != m.allocated() {
        return Err(format!(
            "allocated {} vs model {}",
            st.allocated_bytes,
            m.allocated()
        ));
    }
    f.close().await.map_err(e)?;
    // What was committed reads back the same through a fresh, read-only view.
    let ro = files::DsFile::open_readonly(s.datastore().path(), &name).map_err(e)?;
    verify(&ro, &m)
        .await
        .map_err(|x| format!("after close: {x}"))?;
    drop(ro);
    // Another exclusive open of our file works again.
    s.open(&name, LockMode::Exclusive)
        .await
        .map_err(e)?
        .close()
        .await
        .map_err(e)?;
    Ok(())
}

fn clamp(off: u64, len: u64, size: u64) -> (u64, u64) {
    let off = off.min(size);
    (off, len.min(size - off))
}

fn prov() -> impl Strategy<Value = Provisioning> {
    prop_oneof![
        Just(Provisioning::Thin),
        Just(Provisioning::LazyThick),
        Just(Provisioning::EagerThick),
    ]
}

fn datastore(image: &Path) -> Datastore {
    Datastore::open(image).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
    #[test]
    fn two_hosts_match_the_model(
        pa in prov(), pb in prov(),
        sa in (1u64..6).prop_map(|x| x * MIB - 512 * (x % 2)),
        sb in (1u64..6).prop_map(|x| x * MIB),
        oa in proptest::collection::vec(op(), 1..40),
        ob in proptest::collection::vec(op(), 1..40),
    ) {
        let env = env();
        static CASE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let case = CASE.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let ds = datastore(&env.image);
        let free_before = files::space_info(&ds).unwrap().free_blocks;
        let (a, b) = (Arc::clone(&env.hosts[0].1), Arc::clone(&env.hosts[1].1));
        let (ra, rb) = env.rt.block_on(async {
            let dir_a = format!("/a{case}");
            a.mkdir(&dir_a).unwrap();
            tokio::join!(
                run_host(Arc::clone(&a), format!("{dir_a}/disk"), pa, sa, oa),
                run_host(Arc::clone(&b), format!("/b{case}.raw"), pb, sb, ob),
            )
        });
        prop_assert!(ra.is_ok(), "host a: {:?}", ra);
        prop_assert!(rb.is_ok(), "host b: {:?}", rb);
        let report = check::check(&ds).unwrap();
        prop_assert!(report.clean(), "{report:#?}");
        env.rt.block_on(async {
            a.remove(&format!("/a{case}/disk")).await.unwrap();
            a.remove(&format!("/a{case}")).await.unwrap();
            // Host a deletes host b's file: its blocks go back through b's inboxes.
            a.remove(&format!("/b{case}.raw")).await.unwrap();
        });
        let report = check::check(&ds).unwrap();
        prop_assert!(report.clean(), "after delete: {report:#?}");
        for gone in [format!("/a{case}"), format!("/b{case}.raw")] {
            let gone_now = matches!(files::stat(&ds, &gone), Err(datastore::Error::NotFound { .. }));
            prop_assert!(gone_now, "{} is still there", gone);
        }
        // Space comes back once the owners take their inboxes back; here it counts free
        // already (inbox blocks are free).
        prop_assert_eq!(files::space_info(&ds).unwrap().free_blocks, free_before);
    }
}
