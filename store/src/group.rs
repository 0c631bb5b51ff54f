//! Group commit: the short write transactions of many threads of one process share one
//! commit.
//!
//! Why: a busy service makes several small writes per run (the claim, the run's row, its
//! event batches, the ack), each of which would be a commit of its own; a commit costs a
//! flush of the log to disk (PostgreSQL: ~3 ms on this machine, SQLite in WAL mode: ~50 µs)
//! and, on SQLite, the one file-wide write lock that other threads then wait for. With N
//! writers at once, grouping makes that one commit for all N. It is the textbook
//! leader/follower scheme, with no timer: a caller queues its work; if no commit is in
//! progress it becomes the leader and runs every queued work in one transaction; callers
//! that queue meanwhile wait, and the first of them leads the next group. Alone, a caller
//! pays what it paid before (one transaction); under load, groups grow by themselves.
//!
//! Correctness: each work is an ordinary closure over the transaction, run in the order
//! queued, so it sees the writes of the works before it in its group (a claim after a claim
//! sees the first item taken). When any work of a group fails, the group's transaction is
//! rolled back and every work of it is run again alone, so one bad work costs the others
//! nothing but time and each caller gets its own outcome. Contention (busy, deadlock) is the
//! backend's retry loop's, which reruns the whole group from the start.

use crate::sql::{Backend, Tx};
use crate::{Result, StoreError};
use std::sync::{mpsc, Condvar, Mutex};

/// The most works one group commits: a bound on the transaction's size and on how long the
/// group's leader works for others.
const MAX_GROUP: usize = 256;

/// A queued work, type-erased: run it (within the group's transaction), then deliver.
trait Work: Send {
    /// Run inside a transaction. May be called again (the group was retried or is being
    /// rerun alone); the latest call's value is the one delivered.
    fn apply(&mut self, tx: &mut dyn Tx) -> Result<()>;
    /// The transaction committed (`Ok`) or failed: hand the outcome to the waiting caller.
    fn deliver(self: Box<Self>, outcome: Result<()>);
}

struct Typed<T, F> {
    f: F,
    value: Option<T>,
    reply: mpsc::SyncSender<Result<T>>,
}

impl<T, F> Work for Typed<T, F>
where
    T: Send,
    F: FnMut(&mut dyn Tx) -> Result<T> + Send,
{
    fn apply(&mut self, tx: &mut dyn Tx) -> Result<()> {
        self.value = Some((self.f)(tx)?);
        Ok(())
    }

    fn deliver(self: Box<Self>, outcome: Result<()>) {
        let Typed { value, reply, .. } = *self;
        let result = outcome.and_then(|()| {
            value.ok_or_else(|| {
                StoreError::Backend(anyhow::anyhow!("a grouped write committed without a value"))
            })
        });
        let _ = reply.send(result);
    }
}

#[derive(Default)]
struct Queue {
    works: Vec<Box<dyn Work>>,
    /// Leaders committing a group now.
    leaders: usize,
}

/// The group-commit queue of one store.
pub(crate) struct Group {
    queue: Mutex<Queue>,
    /// Signalled when a leader finishes (a waiting caller may have to lead next).
    idle: Condvar,
    /// How many groups may commit at once: 1 where the database has one writer at a time
    /// (SQLite), more where concurrent transactions flush the log together (PostgreSQL),
    /// so a group's round trips do not hold up the next group.
    max_leaders: usize,
}

impl Group {
    pub fn new(max_leaders: usize) -> Group {
        Group {
            queue: Mutex::new(Queue::default()),
            idle: Condvar::new(),
            max_leaders: max_leaders.max(1),
        }
    }

    /// Run `f` in a write transaction shared with whatever other works are queued now;
    /// returns its value once that transaction committed.
    pub fn write<B, T, F>(&self, backend: &B, f: F) -> Result<T>
    where
        B: Backend,
        T: Send + 'static,
        F: FnMut(&mut dyn Tx) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = mpsc::sync_channel(1);
        let mut q = lock(&self.queue);
        q.works.push(Box::new(Typed {
            f,
            value: None,
            reply,
        }));
        loop {
            // Delivered, by us or by another leader.
            if let Ok(result) = answer.try_recv() {
                return result;
            }
            // Lead a group while there is work and room for a leader: our own work is
            // either queued (we may take it) or in another leader's group (we wait).
            if !q.works.is_empty() && q.leaders < self.max_leaders {
                let n = q.works.len().min(MAX_GROUP);
                let mut works: Vec<Box<dyn Work>> = q.works.drain(..n).collect();
                q.leaders += 1;
                drop(q);
                commit(backend, &mut works);
                q = lock(&self.queue);
                q.leaders -= 1;
                self.idle.notify_all();
                continue;
            }
            q = self.idle.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Commit `works` in one transaction; if it fails, each alone. Every work is delivered.
fn commit<B: Backend>(backend: &B, works: &mut Vec<Box<dyn Work>>) {
    if works.len() > 1 {
        let together = backend.write(&mut |tx| {
            for w in works.iter_mut() {
                w.apply(tx)?;
            }
            Ok(())
        });
        if together.is_ok() {
            for w in works.drain(..) {
                w.deliver(Ok(()));
            }
            return;
        }
    }
    for mut w in works.drain(..) {
        let outcome = backend.write(&mut |tx| w.apply(tx));
        w.deliver(outcome);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
