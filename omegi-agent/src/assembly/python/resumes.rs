//! Generators and coroutines: one span from the first resume to the end.
//!
//! The interpreter runs a generator (or a coroutine, an async generator) in
//! resumes: each `next()`, `send()` or event-loop step enters the eval
//! function with the generator's frame, and leaves it when the generator
//! yields or awaits. The kernel side marks the exits that left the frame
//! suspended ([`span_flags::PYTHON_SUSPENDED`]) and the call that only made
//! the generator ([`span_flags::PYTHON_CREATION`], 3.11+). Here a frame's
//! resumes become one call: the first resume's span id, start, parent and
//! trace, the last one's end and status. What later resumes called hangs
//! from it, and a later resume that began a trace of its own (an event loop
//! outside the project root stepping a task) brings that trace into the
//! first one's.
//!
//! A call is held while suspended, and goes out as it stands (ending
//! `suspended`) when the trace of its first resume ends first (a generator
//! that outlived its caller: its later resumes are a call of their own), or
//! after [`SUSPENDED_KEPT`] without a resume.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use omegi_common::{span_flags, SpanEvent};

/// A call suspended for this long without a resume goes out as it stands.
pub const SUSPENDED_KEPT: Duration = Duration::from_secs(60);

/// The kernel's end reason for a call that went out still suspended (the
/// agent's own; the kernel never sends it).
pub const END_SUSPENDED: u32 = 0x5353_5553;

/// A generator's call between its resumes.
#[derive(Debug)]
struct Open {
    /// Its first resume, ending at the last suspension.
    first: SpanEvent,
    /// The function of its code.
    fn_id: u32,
    since: Instant,
}

/// What to do with a Python call's span.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Not a generator's later resume: it goes on as it is (after the
    /// generator that lay at its frame's address, freed unfinished).
    Plain(Option<SpanEvent>),
    /// Only made the generator: the call is its resumes.
    Drop,
    /// A resume that left the generator suspended: held.
    Held(Moves),
    /// The generator's last resume: `event` stands for the whole call.
    Whole(SpanEvent, Moves),
}

/// What a later resume changes in the traces being assembled.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Moves {
    /// In trace `.0`, the calls with parent `.1` that ended at or after
    /// `.3` (monotonic ns; the resume's start) hang from `.2` instead.
    pub rename: Option<(u64, u64, u64, u64)>,
    /// Trace `.0` (begun by this resume) joins trace `.1`.
    pub join: Option<(u64, u64)>,
    /// A generator freed unfinished where this one now is: its call,
    /// ended as it stood.
    pub freed: Option<SpanEvent>,
}

/// The generators suspended in traced processes.
#[derive(Debug, Default)]
pub struct Resumes {
    /// By (process, frame).
    open: HashMap<(u32, u64), Open>,
}

impl Resumes {
    /// A Python call of `fn_id` ended (`event`): whether it is, or ends, a
    /// generator's call.
    pub fn step(&mut self, event: &SpanEvent, fn_id: u32) -> Step {
        if event.flags & span_flags::PYTHON_CREATION != 0 {
            return Step::Drop;
        }
        let key = (event.tgid, event.object);
        let suspended = event.flags & span_flags::PYTHON_SUSPENDED != 0;
        let first_resume = event.flags & span_flags::PYTHON_FIRST_RESUME != 0;
        let open = self
            .open
            .get(&key)
            .filter(|open| open.fn_id == fn_id && !first_resume && event.object != 0);
        let Some(open) = open else {
            // A generator freed unfinished (its `close()` had nothing to
            // run) may have lain where this one is: it ended as it stood.
            let freed = if first_resume || suspended {
                self.take_one(key)
            } else {
                None
            };
            if !suspended || event.object == 0 {
                return Step::Plain(freed);
            }
            self.open.insert(
                key,
                Open {
                    first: *event,
                    fn_id,
                    since: Instant::now(),
                },
            );
            return Step::Held(Moves {
                freed,
                ..Moves::default()
            });
        };
        let first = open.first;
        let moves = Moves {
            rename: Some((
                event.trace_key,
                event.span_id,
                first.span_id,
                event.start_ns,
            )),
            join: (event.flags & span_flags::TRACE_ROOT != 0 && event.trace_key != first.trace_key)
                .then_some((event.trace_key, first.trace_key)),
            freed: None,
        };
        for open in self.open.values_mut() {
            // Generators first resumed in this resume (held, so not among
            // the trace's spans) hang from the first one too.
            if open.first.parent_span_id == event.span_id {
                open.first.parent_span_id = first.span_id;
            }
            // Generators first resumed in the joining trace are now in the
            // one it joins.
            if let Some((joined, into)) = moves.join {
                if open.first.trace_key == joined {
                    open.first.trace_key = into;
                }
            }
        }
        if suspended {
            let open = self.open.get_mut(&key).expect("found above");
            open.first.end_ns = event.end_ns;
            open.since = Instant::now();
            return Step::Held(moves);
        }
        self.open.remove(&key);
        Step::Whole(whole(&first, event), moves)
    }

    /// The calls suspended whose first resume is in trace `trace_key`,
    /// which is ending: they go out in it, as they stand.
    pub fn take_in_trace(&mut self, trace_key: u64) -> Vec<SpanEvent> {
        if self.open.is_empty() {
            return Vec::new();
        }
        self.take(
            |open| open.first.trace_key == trace_key,
            END_SUSPENDED,
            None,
        )
    }

    /// The calls suspended for longer than [`SUSPENDED_KEPT`].
    pub fn take_stale(&mut self) -> Vec<SpanEvent> {
        if self.open.is_empty() {
            return Vec::new();
        }
        let now = Instant::now();
        self.take(
            |open| now.duration_since(open.since) >= SUSPENDED_KEPT,
            END_SUSPENDED,
            None,
        )
    }

    /// Every call still suspended, ending at `now_ns` with `reason` (at
    /// detach).
    pub fn take_all(&mut self, reason: u32, now_ns: u64) -> Vec<SpanEvent> {
        self.take(|_| true, reason, Some(now_ns))
    }

    /// The call suspended at `key`, ended as it stood.
    fn take_one(&mut self, key: (u32, u64)) -> Option<SpanEvent> {
        let open = self.open.remove(&key)?;
        Some(as_it_stands(&open, END_SUSPENDED, None))
    }

    fn take(
        &mut self,
        which: impl Fn(&Open) -> bool,
        reason: u32,
        end_ns: Option<u64>,
    ) -> Vec<SpanEvent> {
        let keys: Vec<(u32, u64)> = self
            .open
            .iter()
            .filter(|(_, open)| which(open))
            .map(|(key, _)| *key)
            .collect();
        let mut events: Vec<SpanEvent> = keys
            .into_iter()
            .filter_map(|key| self.open.remove(&key))
            .map(|open| as_it_stands(&open, reason, end_ns))
            .collect();
        // Inner calls first, as spans end: deeper, or on one level the
        // later started.
        events.sort_by_key(|event| {
            (
                std::cmp::Reverse(event.depth),
                std::cmp::Reverse(event.start_ns),
            )
        });
        events
    }
}

/// The event of a suspended call ended with `reason`, at `end_ns` or at
/// its last suspension.
fn as_it_stands(open: &Open, reason: u32, end_ns: Option<u64>) -> SpanEvent {
    SpanEvent {
        end_reason: reason,
        end_ns: end_ns.unwrap_or(open.first.end_ns),
        flags: open.first.flags & !span_flags::PYTHON_SUSPENDED,
        // Not NULL: no exception left it.
        ret: 1,
        ..open.first
    }
}

/// The event of a generator's whole call: `first`'s start and place,
/// `last`'s end.
fn whole(first: &SpanEvent, last: &SpanEvent) -> SpanEvent {
    SpanEvent {
        span_id: first.span_id,
        parent_span_id: first.parent_span_id,
        trace_key: first.trace_key,
        start_ns: first.start_ns,
        flags: (first.flags & span_flags::TRACE_ROOT)
            | (last.flags & !(span_flags::TRACE_ROOT | span_flags::PYTHON_SUSPENDED)),
        ..*last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resume(span_id: u64, trace_key: u64, start: u64, end: u64, flags: u32) -> SpanEvent {
        SpanEvent {
            tgid: 1,
            tid: 1,
            fn_id: 7,
            flags,
            start_ns: start,
            end_ns: end,
            span_id,
            parent_span_id: if flags & span_flags::TRACE_ROOT != 0 {
                0
            } else {
                99
            },
            trace_key,
            ret: 1,
            object: 0x1000,
            ..SpanEvent::default()
        }
    }

    const SUSPENDED: u32 = span_flags::PYTHON_SUSPENDED;
    const ROOT: u32 = span_flags::TRACE_ROOT;
    const FIRST: u32 = span_flags::PYTHON_FIRST_RESUME;

    #[test]
    fn resumes_in_one_trace_are_one_call() {
        let mut resumes = Resumes::default();
        assert_eq!(
            resumes.step(&resume(1, 50, 10, 20, SUSPENDED | FIRST), 3),
            Step::Held(Moves::default())
        );
        let Step::Held(moves) = resumes.step(&resume(2, 50, 30, 40, SUSPENDED), 3) else {
            panic!("held");
        };
        assert_eq!(moves.rename, Some((50, 2, 1, 30)));
        assert_eq!(moves.join, None);
        let Step::Whole(event, _) = resumes.step(&resume(3, 50, 50, 60, 0), 3) else {
            panic!("whole");
        };
        assert_eq!(
            (
                event.span_id,
                event.start_ns,
                event.end_ns,
                event.parent_span_id
            ),
            (1, 10, 60, 99)
        );
        assert!(resumes.open.is_empty());
    }

    #[test]
    fn a_resume_that_began_a_trace_joins_the_first_ones() {
        let mut resumes = Resumes::default();
        resumes.step(&resume(1, 1, 10, 20, SUSPENDED | ROOT), 3);
        let Step::Whole(event, moves) = resumes.step(&resume(2, 2, 30, 40, ROOT), 3) else {
            panic!("whole");
        };
        assert_eq!(moves.join, Some((2, 1)));
        assert_eq!(
            (event.span_id, event.trace_key, event.flags & ROOT),
            (1, 1, ROOT)
        );
    }

    #[test]
    fn other_frames_and_creations_are_not_folded() {
        let mut resumes = Resumes::default();
        assert_eq!(resumes.step(&resume(1, 1, 0, 1, 0), 3), Step::Plain(None));
        assert_eq!(
            resumes.step(&resume(1, 1, 0, 1, span_flags::PYTHON_CREATION), 3),
            Step::Drop
        );
        resumes.step(&resume(2, 1, 10, 20, SUSPENDED | FIRST), 3);
        // Another function's call in a frame at the same address.
        assert_eq!(resumes.step(&resume(3, 1, 30, 40, 0), 4), Step::Plain(None));
        let open = resumes.take_in_trace(1);
        assert_eq!(open.len(), 1);
        assert_eq!((open[0].end_reason, open[0].end_ns), (END_SUSPENDED, 20));
    }

    #[test]
    fn a_new_generator_where_a_freed_one_lay_ends_it() {
        let mut resumes = Resumes::default();
        resumes.step(&resume(1, 1, 10, 20, SUSPENDED | FIRST), 3);
        // Freed unfinished; a new generator of the same function, same place.
        let Step::Held(moves) = resumes.step(&resume(2, 1, 30, 40, SUSPENDED | FIRST), 3) else {
            panic!("held");
        };
        let freed = moves.freed.expect("the freed one ends");
        assert_eq!(
            (freed.span_id, freed.end_ns, freed.end_reason),
            (1, 20, END_SUSPENDED)
        );
        assert_eq!(moves.rename, None);
        let Step::Plain(freed) = resumes.step(&resume(3, 1, 50, 60, FIRST), 4) else {
            panic!("plain");
        };
        assert_eq!(freed.map(|event| event.span_id), Some(2));
    }
}
