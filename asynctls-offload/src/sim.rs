//! A CPU stand-in for the GPU: host pool and resident slots are tag arrays
//! (one `u64` per unit or slot), and copies run on a worker thread in issue
//! order after an injected delay, like a copy engine. The engine's logic is
//! the same as over the GPU; property tests use this backend to check that
//! no attention reads a slot whose copy has not landed or that was reused.

use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{OffloadError, Result, Slot, StepTiming, TransferBackend, Unit};

/// Geometry and timing of a simulated backend.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimConfig {
    pub num_layers: usize,
    pub kv_heads: usize,
    pub host_blocks: usize,
    pub slots_per_layer: usize,
    pub unit_bytes: usize,
    /// Delay of one copy batch: `per_batch + per_unit * units`.
    pub per_batch: Duration,
    pub per_unit: Duration,
}

#[derive(Debug, Default)]
struct Done {
    finished: Mutex<bool>,
    cv: Condvar,
}

impl Done {
    fn wait(&self) {
        let mut f = self.finished.lock().expect("sim lock");
        while !*f {
            f = self.cv.wait(f).expect("sim lock");
        }
    }
    fn set(&self) {
        *self.finished.lock().expect("sim lock") = true;
        self.cv.notify_all();
    }
    fn is_set(&self) -> bool {
        *self.finished.lock().expect("sim lock")
    }
}

/// A batch of copies in flight.
#[derive(Debug, Clone)]
pub struct SimTicket(Arc<Done>);

enum Job {
    Copy {
        delay: Duration,
        run: Box<dyn FnOnce() + Send>,
        done: Arc<Done>,
    },
    Stop,
}

/// Tags of the host pool (`[layer][unit index]`) and of the slots (`[layer][slot]`).
pub type Tags = Arc<Vec<Mutex<Vec<u64>>>>;

/// The simulated backend.
pub struct SimBackend {
    config: SimConfig,
    pub host: Tags,
    pub device: Tags,
    jobs: Sender<Job>,
    worker: Option<JoinHandle<()>>,
    transfer: Duration,
    exposed: Duration,
    last: Option<SimTicket>,
}

impl std::fmt::Debug for SimBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimBackend").field("config", &self.config).finish()
    }
}

impl SimBackend {
    /// Host units start tagged `tag(layer, unit)`; slots start at `u64::MAX` (garbage).
    pub fn new(config: SimConfig, tag: impl Fn(usize, Unit) -> u64) -> Self {
        let units = config.host_blocks * config.kv_heads;
        let host: Tags = Arc::new(
            (0..config.num_layers)
                .map(|layer| {
                    Mutex::new(
                        (0..units)
                            .map(|i| {
                                let unit = Unit::new((i / config.kv_heads) as u32, (i % config.kv_heads) as u16);
                                tag(layer, unit)
                            })
                            .collect(),
                    )
                })
                .collect(),
        );
        let device: Tags = Arc::new(
            (0..config.num_layers)
                .map(|_| Mutex::new(vec![u64::MAX; config.slots_per_layer]))
                .collect(),
        );
        let (jobs, rx) = channel::<Job>();
        let worker = std::thread::spawn(move || {
            while let Ok(Job::Copy { delay, run, done }) = rx.recv() {
                std::thread::sleep(delay);
                run();
                done.set();
            }
        });
        SimBackend {
            config,
            host,
            device,
            jobs,
            worker: Some(worker),
            transfer: Duration::ZERO,
            exposed: Duration::ZERO,
            last: None,
        }
    }

    fn submit(&mut self, units: usize, run: Box<dyn FnOnce() + Send>) -> Result<SimTicket> {
        let delay = self.config.per_batch + self.config.per_unit * units as u32;
        let done = Arc::new(Done::default());
        self.jobs
            .send(Job::Copy {
                delay,
                run,
                done: done.clone(),
            })
            .map_err(|_| OffloadError::Transfer("the simulated copy engine stopped".into()))?;
        self.transfer += delay;
        let ticket = SimTicket(done);
        self.last = Some(ticket.clone());
        Ok(ticket)
    }
}

impl Drop for SimBackend {
    fn drop(&mut self) {
        let _ = self.jobs.send(Job::Stop);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl TransferBackend for SimBackend {
    type Ticket = SimTicket;

    fn num_layers(&self) -> usize {
        self.config.num_layers
    }
    fn kv_heads(&self) -> usize {
        self.config.kv_heads
    }
    fn host_blocks(&self) -> usize {
        self.config.host_blocks
    }
    fn slots_per_layer(&self) -> usize {
        self.config.slots_per_layer
    }
    fn unit_bytes(&self) -> usize {
        self.config.unit_bytes
    }

    fn fetch(&mut self, layer: usize, copies: &[(Unit, Slot)]) -> Result<SimTicket> {
        let (host, device, heads) = (self.host.clone(), self.device.clone(), self.config.kv_heads);
        let copies = copies.to_vec();
        let n = copies.len();
        self.submit(
            n,
            Box::new(move || {
                let host = host[layer].lock().expect("sim lock");
                let mut device = device[layer].lock().expect("sim lock");
                for (unit, slot) in copies {
                    device[slot as usize] = host[unit.index(heads)];
                }
            }),
        )
    }

    fn flush(&mut self, layer: usize, copies: &[(Slot, Unit)]) -> Result<SimTicket> {
        let (host, device, heads) = (self.host.clone(), self.device.clone(), self.config.kv_heads);
        let copies = copies.to_vec();
        let n = copies.len();
        self.submit(
            n,
            Box::new(move || {
                let device = device[layer].lock().expect("sim lock");
                let mut host = host[layer].lock().expect("sim lock");
                for (slot, unit) in copies {
                    host[unit.index(heads)] = device[slot as usize];
                }
            }),
        )
    }

    fn is_complete(&mut self, ticket: &SimTicket) -> Result<bool> {
        Ok(ticket.0.is_set())
    }

    fn order_before_compute(&mut self, ticket: &SimTicket) -> Result<()> {
        // The simulated compute runs on the host: it waits for the copies.
        let start = Instant::now();
        ticket.0.wait();
        self.exposed += start.elapsed();
        Ok(())
    }

    fn reads_done(&mut self, _layer: usize) -> Result<()> {
        // Host compute has finished reading when it returns.
        Ok(())
    }

    fn synchronize(&mut self) -> Result<()> {
        if let Some(t) = self.last.take() {
            t.0.wait();
        }
        Ok(())
    }

    fn finish_step(&mut self) -> Result<StepTiming> {
        // Transfer time is charged when a batch is issued (its injected delay).
        let timing = StepTiming {
            transfer: self.transfer,
            exposed: self.exposed.min(self.transfer),
        };
        self.transfer = Duration::ZERO;
        self.exposed = Duration::ZERO;
        Ok(timing)
    }
}
