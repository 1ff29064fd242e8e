//! Isolated backends: the same driver `.so`, served by a worker process (`plughost __worker`) so that
//! nothing the driver does (a segfault, an abort, `exit`, a hang, a deadlock, a leak) can take the host
//! down. The managers do not know: an isolated backend's driver is the kind's remote client
//! (`plughost_api`'s `Remote*`) over a [`Transport`](plughost_api::host::Transport) that sends typed calls to the worker.
//!
//! **Wire.** One socketpair per worker. Frames: a little-endian `u32` length, a `u64` request id, then
//! the payload (postcard). Id 0 is the setup exchange ([`Setup`] → [`SetupReply`]); every other id is one
//! call (`I::Call` → `I::Reply`). Many calls are in flight at once; the worker answers each as it
//! finishes (its threads take turns reading: whoever reads a frame runs it, the next one reads on).
//!
//! **Worker hygiene.** Started by the host with only the descriptors it needs (stdin and stdout on
//! /dev/null, stderr a pipe into the host log with the backend's name, the socket on fd 3, the sealed
//! library copy on fd 4); its own process group; `PR_SET_PDEATHSIG` (SIGKILL), checked against the
//! parent right after; no new privileges; optionally another user and group and an address-space
//! limit.
//!
//! **Faults.** When a worker dies, every call in flight on it is answered at once with `driver_crashed`
//! naming the backend and how it died. A call that outlives `call_timeout` is answered `timeout` and the
//! worker is killed (a hung driver is not trusted again). The [`Supervisor`] restarts the worker with
//! exponential backoff (100 ms doubling to 30 s, back to 100 ms after a healthy minute); 5 crashes within
//! 60 s open the circuit: the backend is down until a swap, a reload or `plughost ctl restart`.
//!
//! Files: `wire` (frames, setup, what both ends share), `child` (the worker's side), `process` (the
//! host's side of one worker process), `supervisor` (restarts, circuit, transport).

mod child;
mod process;
mod supervisor;
mod wire;

pub use child::{child_main, serve, WorkerArgs};
pub use process::WorkerConfig;
pub use supervisor::{SupervisedTransport, Supervisor};
pub use wire::{Setup, SetupReply};
