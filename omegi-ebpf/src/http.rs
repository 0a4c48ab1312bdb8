//! HTTP/1.x on traced processes' TCP sockets, seen from syscall tracepoints
//! (this machine's kernel has neither kprobes nor fentry).
//!
//! The enter tracepoint of a read or write stashes its file descriptor and
//! buffer per thread; the exit tracepoint, which knows how many bytes moved,
//! looks at them. A connection is learnt from its first bytes: a request
//! line read makes it a server's, one written a client's; only then is the
//! descriptor followed to its socket (TCP, and its addresses). Everything
//! else a traced process reads or writes costs two map operations and an
//! 8-byte copy; other processes cost the `TGIDS` lookup.
//!
//! A server request is a span kept in the reading thread's stack
//! (`ThreadStack::request`): traced calls the thread makes at the request's
//! depth are its children (`stack::push`), and it ends once its response's
//! first bytes are written *and* the calls under it have returned, so that
//! it reaches the agent after them, as a root does. A client request is a
//! child of the thread's innermost traced call (or of the request it is
//! answering); the first `HTTP/1.` read on its connection ends it.
//!
//! Requests' bytes go to the agent as `HttpEvent` chunks under the span's
//! id, which parses them (method, path, `traceparent`). Pipelined requests
//! read in one go are one span; writes or reads made through several
//! iovecs are seen through their first one.

use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_user, generated,
    },
    macros::{map, tracepoint},
    maps::LruHashMap,
    programs::TracePointContext,
    Global,
};
use omegi_common::{
    counter, end_reason, event_kind, http_part, span_flags, Endpoint, HttpEvent, SocketOffsets,
    SpanEvent, ThreadStack, HTTP_CHUNK, HTTP_MAX_COPY, HTTP_RESPONSE_COPY, NO_FUNCTION,
};

use crate::{count, is_traced, stack, ALL_PROCESSES, EVENTS};

/// See `omegi_common::globals::HTTP_ENABLED`.
#[no_mangle]
static HTTP_ENABLED: Global<u8> = Global::new(0);

/// See `omegi_common::globals::SOCKET_OFFSETS`.
#[no_mangle]
static SOCKET_OFFSETS: Global<SocketOffsets> = Global::new(SocketOffsets {
    task_files: 0,
    files_fdt: 0,
    fdtable_fd: 0,
    file_private_data: 0,
    file_inode: 0,
    inode_mode: 0,
    socket_type: 0,
    socket_sk: 0,
    sk_daddr: 0,
    sk_rcv_saddr: 0,
    sk_dport: 0,
    sk_num: 0,
    sk_family: 0,
    sk_v6_daddr: 0,
    sk_v6_rcv_saddr: 0,
    _pad: 0,
});

/// A read or write in progress, from its enter tracepoint to its exit.
#[repr(C)]
#[derive(Clone, Copy)]
struct PendingIo {
    fd: u32,
    /// 1 for a write.
    write: u32,
    /// The process: a thread id reused by another process after a thread
    /// died in a syscall must not find the dead one's entry.
    tgid: u32,
    _pad: u32,
    buf: u64,
    /// The buffer's size (an iovec's length; `u64::MAX` for a plain buffer,
    /// whose size the byte count bounds).
    size: u64,
}

/// By thread. Least recently used first out: a thread killed in a syscall
/// never reaches its exit tracepoint, and its entry must not stay for good.
#[map]
static PENDING_IO: LruHashMap<u32, PendingIo> = LruHashMap::with_max_entries(4096, 0);

const ROLE_SERVER: u32 = 1;
const ROLE_CLIENT: u32 = 2;

/// A client request in flight on a connection.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ClientCall {
    span_id: u64,
    parent_span_id: u64,
    trace_key: u64,
    start_ns: u64,
    tid: u32,
    depth: u32,
    /// The span ids and trace keys of the innermost `ANCESTORS` frames at
    /// the write (outermost first; 0 where the stack was shallower): the
    /// call that wrote may have returned by the time the response is read
    /// (a `send_all` helper), and the span's parent is then the innermost
    /// of them still running, so that it lies within its parent.
    ancestors: [u64; ANCESTORS],
    ancestor_keys: [u64; ANCESTORS],
}

const ANCESTORS: usize = 4;

/// An HTTP connection of a traced process (key: tgid << 32 | fd).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Connection {
    role: u32,
    /// Bytes of the current request copied to the agent.
    copied: u32,
    /// Server: the request being answered and the thread that read it.
    request_span_id: u64,
    request_tid: u32,
    _pad: u32,
    /// Server: when the request was read (a Go program's requests are kept
    /// here alone: see `start_request`).
    request_start_ns: u64,
    client: ClientCall,
    local: Endpoint,
    peer: Endpoint,
}

/// Learnt HTTP connections; removed at `close`. Least recently used first
/// out: a process that exits closes its sockets without a `close` call.
#[map]
static CONNECTIONS: LruHashMap<u64, Connection> = LruHashMap::with_max_entries(8192, 0);

// Syscall tracepoint records: 8 bytes of common fields, the syscall number,
// then each argument (enter) or the return value (exit) as 8 bytes.
const ARG0: usize = 16;
const ARG1: usize = 24;
const RET: usize = 16;

/// `read`, `recvfrom` (fd, buffer, size).
#[tracepoint]
pub fn omegi_io_read(ctx: TracePointContext) -> u32 {
    on_enter_buffer(&ctx, 0);
    0
}

/// `write`, `sendto` (fd, buffer, size).
#[tracepoint]
pub fn omegi_io_write(ctx: TracePointContext) -> u32 {
    on_enter_buffer(&ctx, 1);
    0
}

/// `readv` (fd, iovec array, count).
#[tracepoint]
pub fn omegi_io_readv(ctx: TracePointContext) -> u32 {
    on_enter_iovec(&ctx, 0, false);
    0
}

/// `writev` (fd, iovec array, count).
#[tracepoint]
pub fn omegi_io_writev(ctx: TracePointContext) -> u32 {
    on_enter_iovec(&ctx, 1, false);
    0
}

/// `recvmsg` (fd, msghdr, flags).
#[tracepoint]
pub fn omegi_io_recvmsg(ctx: TracePointContext) -> u32 {
    on_enter_iovec(&ctx, 0, true);
    0
}

/// `sendmsg` (fd, msghdr, flags).
#[tracepoint]
pub fn omegi_io_sendmsg(ctx: TracePointContext) -> u32 {
    on_enter_iovec(&ctx, 1, true);
    0
}

/// The exit of every syscall above.
#[tracepoint]
pub fn omegi_io_exit(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let Some(io) = (unsafe { PENDING_IO.get(&tid) }).copied() else {
        return 0;
    };
    let _ = PENDING_IO.remove(&tid);
    let moved: i64 = unsafe { ctx.read_at(RET) }.unwrap_or(0);
    if moved > 0 && io.tgid == tgid {
        on_bytes(&io, moved as u64, tgid, tid);
    }
    0
}

/// `close` (fd): a request or call still open on it ends.
#[tracepoint]
pub fn omegi_io_close(ctx: TracePointContext) -> u32 {
    let Some((tgid, tid)) = http_thread() else {
        return 0;
    };
    let fd: u64 = unsafe { ctx.read_at(ARG0) }.unwrap_or(u64::MAX);
    let key = (u64::from(tgid) << 32) | (fd & 0xffff_ffff);
    let Some(connection) = CONNECTIONS.get_ptr_mut(&key) else {
        return 0;
    };
    let connection = unsafe { &mut *connection };
    let now = unsafe { bpf_ktime_get_ns() };
    if connection.role == ROLE_SERVER && connection.request_span_id != 0 {
        let span_id = connection.request_span_id;
        end_request(connection, span_id, fd as u32, tgid, tid, now, end_reason::NOT_ANSWERED);
    }
    if connection.role == ROLE_CLIENT && connection.client.span_id != 0 {
        let call = connection.client;
        emit_client(&call, tgid, now, end_reason::CONNECTION_CLOSED, fd as u32);
    }
    let _ = CONNECTIONS.remove(&key);
    0
}

/// The current thread's ids, if HTTP is followed and its process traced
/// (with `--binary`, only threads that made traced calls: every process
/// passes the process check then).
#[inline(always)]
fn http_thread() -> Option<(u32, u32)> {
    if HTTP_ENABLED.load() == 0 {
        return None;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if !is_traced(tgid) {
        return None;
    }
    if ALL_PROCESSES.load() != 0 && stack::thread_stack(tid).is_none() {
        return None;
    }
    Some((tgid, tid))
}

#[inline(always)]
fn on_enter_buffer(ctx: &TracePointContext, write: u32) {
    let Some((tgid, tid)) = http_thread() else {
        return;
    };
    let fd: u64 = unsafe { ctx.read_at(ARG0) }.unwrap_or(u64::MAX);
    let buf: u64 = unsafe { ctx.read_at(ARG1) }.unwrap_or(0);
    let io = PendingIo {
        fd: fd as u32,
        write,
        tgid,
        _pad: 0,
        buf,
        size: u64::MAX,
    };
    let _ = PENDING_IO.insert(&tid, &io, 0);
}

/// For `readv`/`writev` the second argument is the iovec array; for
/// `recvmsg`/`sendmsg` a `struct user_msghdr`, whose `msg_iov` is at 16.
#[inline(always)]
fn on_enter_iovec(ctx: &TracePointContext, write: u32, msghdr: bool) {
    let Some((tgid, tid)) = http_thread() else {
        return;
    };
    let fd: u64 = unsafe { ctx.read_at(ARG0) }.unwrap_or(u64::MAX);
    let mut vector: u64 = unsafe { ctx.read_at(ARG1) }.unwrap_or(0);
    if msghdr {
        vector = unsafe { bpf_probe_read_user((vector + 16) as *const u64) }.unwrap_or(0);
    }
    if vector == 0 {
        return;
    }
    let Ok(first) = (unsafe { bpf_probe_read_user(vector as *const [u64; 2]) }) else {
        return;
    };
    let io = PendingIo {
        fd: fd as u32,
        write,
        tgid,
        _pad: 0,
        buf: first[0],
        size: first[1],
    };
    let _ = PENDING_IO.insert(&tid, &io, 0);
}

/// `moved` bytes went through `io`'s buffer.
#[inline(always)]
fn on_bytes(io: &PendingIo, moved: u64, tgid: u32, tid: u32) {
    let len = if moved < io.size { moved } else { io.size };
    let key = (u64::from(tgid) << 32) | u64::from(io.fd);
    let now = unsafe { bpf_ktime_get_ns() };
    let start = first_bytes(io.buf, len);
    let Some(connection) = connection(key, io, start) else {
        return;
    };
    if connection.role == ROLE_SERVER {
        on_server_bytes(connection, io, len, start, tgid, tid, now);
    } else {
        on_client_bytes(connection, io, len, start, tgid, tid, now);
    }
}

/// The connection `key`, learnt now if its first bytes (`start`) are a
/// request line on a TCP socket.
#[inline(always)]
fn connection(key: u64, io: &PendingIo, start: u64) -> Option<&'static mut Connection> {
    if let Some(known) = CONNECTIONS.get_ptr_mut(&key) {
        return Some(unsafe { &mut *known });
    }
    if !is_request_line(start) {
        return None;
    }
    let mut connection = Connection {
        role: if io.write == 0 {
            ROLE_SERVER
        } else {
            ROLE_CLIENT
        },
        ..Default::default()
    };
    if !tcp_endpoints(io.fd, &mut connection) {
        return None;
    }
    if CONNECTIONS.insert(&key, &connection, 0).is_err() {
        count(counter::CONNECTIONS_FULL);
        return None;
    }
    CONNECTIONS
        .get_ptr_mut(&key)
        .map(|connection| unsafe { &mut *connection })
}

#[inline(always)]
fn on_server_bytes(
    connection: &mut Connection,
    io: &PendingIo,
    len: u64,
    start: u64,
    tgid: u32,
    tid: u32,
    now: u64,
) {
    if io.write == 0 {
        if connection.request_span_id != 0 {
            // More of the request (its head split over reads, or its body).
            send_chunks(connection, io, len, http_part::SERVER_REQUEST, connection.request_span_id, tgid, tid);
            return;
        }
        if !is_request_line(start) {
            return;
        }
        let Some(span_id) = start_request(io, tgid, tid, now) else {
            return;
        };
        connection.request_span_id = span_id;
        connection.request_tid = tid;
        connection.request_start_ns = now;
        connection.copied = 0;
        send_chunks(connection, io, len, http_part::SERVER_REQUEST, span_id, tgid, tid);
        return;
    }
    if connection.request_span_id == 0 {
        return;
    }
    // The response's first bytes: the request is answered, by whichever
    // thread writes them.
    let span_id = connection.request_span_id;
    connection.request_span_id = 0;
    connection.copied = HTTP_MAX_COPY - HTTP_RESPONSE_COPY;
    send_chunks(connection, io, len, http_part::SERVER_RESPONSE, span_id, tgid, tid);
    end_request(connection, span_id, io.fd, tgid, tid, now, end_reason::RETURNED);
}

/// A request line was read on thread `tid`: the new request's span id.
///
/// The request lives in the reading thread's stack, so that the calls the
/// thread makes answering it are its children. Not in a Go program:
/// goroutines run on any thread and move between them, so there the request
/// lives in its connection alone and has no children (the goroutine that
/// answers it is not known here).
#[inline(always)]
fn start_request(io: &PendingIo, tgid: u32, tid: u32, now: u64) -> Option<u64> {
    if crate::goroutine::enabled() {
        return Some(stack::random_id());
    }
    let stack = match stack::thread_stack(tid) {
        Some(stack) => stack,
        None => match stack::new_thread_stack(tgid, tid) {
            Some(stack) => stack,
            None => {
                count(counter::THREADS_FULL);
                return None;
            }
        },
    };
    if stack.request.span_id != 0 {
        // An event loop moved on to another request unanswered.
        emit_request(stack, now, tid, end_reason::NOT_ANSWERED);
    }
    let span_id = stack::next_span_id(stack);
    stack.request.span_id = span_id;
    stack.request.start_ns = now;
    stack.request.responded_ns = 0;
    stack.request.depth = stack.depth;
    stack.request.fd = io.fd;
    Some(span_id)
}

/// The connection's request `span_id` was answered (`RETURNED`, by thread
/// `tid`) or given up (`NOT_ANSWERED`: the connection closed). One answered
/// on the thread that read it ends once the calls under it have returned
/// (`frame_left`); otherwise it ends now.
#[inline(always)]
fn end_request(
    connection: &Connection,
    span_id: u64,
    fd: u32,
    tgid: u32,
    tid: u32,
    now: u64,
    reason: u32,
) {
    let reader = connection.request_tid;
    if crate::goroutine::enabled() {
        emit_server(tgid, reader, span_id, connection.request_start_ns, now, reason, 0, fd);
        return;
    }
    let Some(stack) = stack::thread_stack(reader) else {
        return;
    };
    if stack.request.span_id != span_id {
        return;
    }
    if reason != end_reason::RETURNED {
        emit_request(stack, now, reader, reason);
        return;
    }
    stack.request.responded_ns = now;
    if stack.depth <= stack.request.depth || reader != tid {
        emit_request(stack, now, reader, end_reason::RETURNED);
    }
}

#[inline(always)]
fn on_client_bytes(
    connection: &mut Connection,
    io: &PendingIo,
    len: u64,
    start: u64,
    tgid: u32,
    tid: u32,
    now: u64,
) {
    if io.write != 0 {
        if connection.client.span_id != 0 {
            send_chunks(connection, io, len, http_part::CLIENT_REQUEST, connection.client.span_id, tgid, tid);
            return;
        }
        if !is_request_line(start) {
            return;
        }
        let Some(stack) = stack::thread_stack(tid) else {
            return;
        };
        let Some((parent_span_id, trace_key)) = current_parent(stack) else {
            return;
        };
        let span_id = stack::next_span_id(stack);
        let mut call = ClientCall {
            span_id,
            parent_span_id,
            trace_key,
            start_ns: now,
            tid,
            depth: stack.depth,
            ..Default::default()
        };
        if parent_span_id != stack.request.span_id {
            for index in 0..ANCESTORS {
                let depth = stack.depth as usize + index;
                if depth >= ANCESTORS {
                    let frame = &stack.frames[stack::slot(depth - ANCESTORS)];
                    call.ancestors[index] = frame.span_id;
                    call.ancestor_keys[index] = frame.trace_key;
                }
            }
        }
        connection.client = call;
        connection.copied = 0;
        send_chunks(connection, io, len, http_part::CLIENT_REQUEST, span_id, tgid, tid);
        return;
    }
    if connection.client.span_id == 0 || !is_status_line(start) {
        return;
    }
    let mut call = connection.client;
    connection.client.span_id = 0;
    connection.copied = HTTP_MAX_COPY - HTTP_RESPONSE_COPY;
    send_chunks(connection, io, len, http_part::CLIENT_RESPONSE, call.span_id, tgid, tid);
    if tid == call.tid {
        if let Some(stack) = stack::thread_stack(tid) {
            still_running_parent(stack, &mut call);
        }
    }
    emit_client(&call, tgid, now, end_reason::RETURNED, io.fd);
}

/// The span a client call made now on this thread is a child of: the
/// innermost traced call, or the request the thread answers at its depth.
#[inline(always)]
fn current_parent(stack: &ThreadStack) -> Option<(u64, u64)> {
    let depth = stack.depth as usize;
    if stack.request.span_id != 0 && stack.depth == stack.request.depth {
        return Some((stack.request.span_id, stack.request.span_id));
    }
    if depth == 0 {
        return None;
    }
    let frame = &stack.frames[stack::slot(depth - 1)];
    Some((frame.span_id, frame.trace_key))
}

/// Makes `call`'s parent the innermost of its write-time ancestors still on
/// the stack (the same frame: same depth, same span id); the write-time
/// parent stays when none is.
#[inline(always)]
fn still_running_parent(stack: &ThreadStack, call: &mut ClientCall) {
    for back in 0..ANCESTORS {
        let index = ANCESTORS - 1 - back;
        let depth = call.depth as usize + index;
        if call.ancestors[index] == 0 || depth < ANCESTORS {
            continue;
        }
        let depth = depth - ANCESTORS;
        if depth < stack.depth as usize
            && stack.frames[stack::slot(depth)].span_id == call.ancestors[index]
        {
            call.parent_span_id = call.ancestors[index];
            call.trace_key = call.ancestor_keys[index];
            return;
        }
    }
}

/// A frame at `index` of a thread answering a request ended: the request's
/// depth follows the stack down, and an answered request whose calls have
/// all returned ends.
#[inline(always)]
pub fn frame_left(stack: &mut ThreadStack, index: u32, now: u64, tid: u32) {
    if index < stack.request.depth {
        stack.request.depth = index;
    }
    if stack.request.responded_ns != 0 && index <= stack.request.depth {
        emit_request(stack, now, tid, end_reason::RETURNED);
    }
}

/// A thread exits: a request it had not answered ends with it.
#[inline(always)]
pub fn thread_exit(stack: &mut ThreadStack, now: u64, tid: u32) {
    if stack.request.span_id != 0 {
        let reason = if stack.request.responded_ns != 0 {
            end_reason::RETURNED
        } else {
            end_reason::THREAD_EXIT
        };
        emit_request(stack, now, tid, reason);
    }
}

/// Emits the thread's request as a `SERVER` span (a trace root) and clears it.
#[inline(always)]
fn emit_request(stack: &mut ThreadStack, now: u64, tid: u32, reason: u32) {
    let request = stack.request;
    stack.request.span_id = 0;
    stack.request.responded_ns = 0;
    emit_server(
        stack.tgid,
        tid,
        request.span_id,
        request.start_ns,
        now,
        reason,
        request.depth,
        request.fd,
    );
}

/// Emits a `SERVER` span: a trace root whose key is its own id.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn emit_server(
    tgid: u32,
    tid: u32,
    span_id: u64,
    start_ns: u64,
    end_ns: u64,
    reason: u32,
    depth: u32,
    fd: u32,
) {
    emit(&SpanEvent {
        kind: event_kind::SPAN,
        end_reason: reason,
        tgid,
        tid,
        fn_id: NO_FUNCTION,
        flags: span_flags::TRACE_ROOT | span_flags::HTTP_SERVER,
        depth,
        code_unit: 0,
        start_ns,
        end_ns,
        span_id,
        parent_span_id: 0,
        trace_key: span_id,
        ret: u64::from(fd),
        entry_ip: 0,
        object: 0,
    });
}

#[inline(always)]
fn emit_client(call: &ClientCall, tgid: u32, now: u64, reason: u32, fd: u32) {
    emit(&SpanEvent {
        kind: event_kind::SPAN,
        end_reason: reason,
        tgid,
        tid: call.tid,
        fn_id: NO_FUNCTION,
        flags: span_flags::HTTP_CLIENT,
        depth: call.depth,
        code_unit: 0,
        start_ns: call.start_ns,
        end_ns: now,
        span_id: call.span_id,
        parent_span_id: call.parent_span_id,
        trace_key: call.trace_key,
        ret: u64::from(fd),
        entry_ip: 0,
        object: 0,
    });
}

#[inline(always)]
fn emit(event: &SpanEvent) {
    match EVENTS.reserve::<SpanEvent>(0) {
        Some(mut entry) => {
            entry.write(*event);
            entry.submit(BPF_RB_NO_WAKEUP as u64);
        }
        None => count(counter::RING_FULL),
    }
}

/// Copies up to 4 chunks of the `len` bytes at `io.buf` to the agent, while
/// the message has had fewer than `HTTP_MAX_COPY` bytes copied.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn send_chunks(
    connection: &mut Connection,
    io: &PendingIo,
    len: u64,
    part: u32,
    span_id: u64,
    tgid: u32,
    tid: u32,
) {
    let mut offset: u64 = 0;
    for _ in 0..(HTTP_MAX_COPY as usize / HTTP_CHUNK) {
        if offset >= len || connection.copied >= HTTP_MAX_COPY {
            return;
        }
        let mut size = len - offset;
        if size > HTTP_CHUNK as u64 {
            size = HTTP_CHUNK as u64;
        }
        let room = u64::from(HTTP_MAX_COPY - connection.copied);
        if size > room {
            size = room;
        }
        let Some(entry) = EVENTS.reserve::<HttpEvent>(0) else {
            count(counter::RECORDS_RING_FULL);
            return;
        };
        // Submitted below through this same pointer.
        let event = unsafe { &mut *entry.as_ptr().cast_mut() };
        core::mem::forget(entry);
        event.kind = event_kind::HTTP;
        event.part = part;
        event.tgid = tgid;
        event.tid = tid;
        event.fd = io.fd;
        event.span_id = span_id;
        event.local = connection.local;
        event.peer = connection.peer;
        let bounded = size as u32;
        let source = (io.buf + offset) as *const core::ffi::c_void;
        let destination = event.data.as_mut_ptr().cast();
        // The verifier must see the size's bound at the call itself: a
        // whole chunk is a constant, anything shorter a masked value read
        // back through the stack (older verifiers lose the bound of a value
        // clamped earlier: 6.1 refused "R2 min value is negative").
        let copied = if bounded >= HTTP_CHUNK as u32 {
            unsafe {
                generated::bpf_probe_read_user(destination, HTTP_CHUNK as u32, source)
            }
        } else {
            let short = unsafe { core::ptr::read_volatile(&bounded) } & (HTTP_CHUNK as u32 - 1);
            unsafe { generated::bpf_probe_read_user(destination, short, source) }
        };
        let bounded = if bounded >= HTTP_CHUNK as u32 {
            HTTP_CHUNK as u32
        } else {
            bounded
        };
        // Only `len` bytes are ever read by the agent: a failed copy sends
        // none, never stale bytes of an earlier record.
        event.len = if copied == 0 { bounded } else { 0 };
        unsafe {
            generated::bpf_ringbuf_submit(
                (event as *mut HttpEvent).cast(),
                BPF_RB_NO_WAKEUP as u64,
            )
        };
        connection.copied += bounded;
        offset += u64::from(bounded);
    }
}

/// The first 8 bytes at `buf` (fewer when `len` is shorter, the rest 0), as
/// a little-endian number.
#[inline(always)]
fn first_bytes(buf: u64, len: u64) -> u64 {
    if len < 4 {
        return 0;
    }
    let value = unsafe { bpf_probe_read_user(buf as *const u64) }.unwrap_or(0);
    if len >= 8 {
        value
    } else {
        value & ((1u64 << (len * 8)) - 1)
    }
}

/// `bytes` (little-endian) starts with `text`.
#[inline(always)]
fn starts_with(bytes: u64, text: &[u8]) -> bool {
    let mut value = 0u64;
    let mut mask = 0u64;
    let mut index = 0;
    while index < text.len() && index < 8 {
        value |= u64::from(text[index]) << (index * 8);
        mask |= 0xff << (index * 8);
        index += 1;
    }
    bytes & mask == value
}

#[inline(always)]
fn is_request_line(start: u64) -> bool {
    starts_with(start, b"GET /")
        || starts_with(start, b"POST /")
        || starts_with(start, b"PUT /")
        || starts_with(start, b"PATCH /")
        || starts_with(start, b"DELETE /")
        || starts_with(start, b"HEAD /")
        || starts_with(start, b"OPTIONS ")
}

#[inline(always)]
fn is_status_line(start: u64) -> bool {
    starts_with(start, b"HTTP/1.")
}

const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;
const SOCK_STREAM: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// Follows `fd` of the current task to its socket: true, with the
/// connection's endpoints filled in, when it is a TCP socket.
#[inline(always)]
fn tcp_endpoints(fd: u32, connection: &mut Connection) -> bool {
    let offsets = SOCKET_OFFSETS.load();
    if offsets.task_files == 0 {
        return false;
    }
    read_socket(fd, &offsets, connection).is_some()
}

#[inline(always)]
fn read_socket(fd: u32, offsets: &SocketOffsets, connection: &mut Connection) -> Option<()> {
    let field = |base: *const u8, offset: u32| unsafe { base.add(offset as usize) };
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let files: *const u8 =
        unsafe { bpf_probe_read_kernel(field(task, offsets.task_files).cast()) }.ok()?;
    let fdt: *const u8 =
        unsafe { bpf_probe_read_kernel(field(files, offsets.files_fdt).cast()) }.ok()?;
    let fds: *const *const u8 =
        unsafe { bpf_probe_read_kernel(field(fdt, offsets.fdtable_fd).cast()) }.ok()?;
    let file: *const u8 = unsafe { bpf_probe_read_kernel(fds.add(fd as usize)) }.ok()?;
    if file.is_null() {
        return None;
    }
    let inode: *const u8 =
        unsafe { bpf_probe_read_kernel(field(file, offsets.file_inode).cast()) }.ok()?;
    let mode: u16 = unsafe { bpf_probe_read_kernel(field(inode, offsets.inode_mode).cast()) }.ok()?;
    if mode & S_IFMT != S_IFSOCK {
        return None;
    }
    let socket: *const u8 =
        unsafe { bpf_probe_read_kernel(field(file, offsets.file_private_data).cast()) }.ok()?;
    let kind: u16 =
        unsafe { bpf_probe_read_kernel(field(socket, offsets.socket_type).cast()) }.ok()?;
    if kind != SOCK_STREAM {
        return None;
    }
    let sock: *const u8 =
        unsafe { bpf_probe_read_kernel(field(socket, offsets.socket_sk).cast()) }.ok()?;
    let family: u16 =
        unsafe { bpf_probe_read_kernel(field(sock, offsets.sk_family).cast()) }.ok()?;
    let local_port: u16 =
        unsafe { bpf_probe_read_kernel(field(sock, offsets.sk_num).cast()) }.ok()?;
    let peer_port: u16 =
        unsafe { bpf_probe_read_kernel(field(sock, offsets.sk_dport).cast()) }.ok()?;
    connection.local.port = local_port;
    connection.peer.port = u16::from_be(peer_port);
    connection.local.family = family;
    connection.peer.family = family;
    if family == AF_INET {
        let local: [u8; 4] =
            unsafe { bpf_probe_read_kernel(field(sock, offsets.sk_rcv_saddr).cast()) }.ok()?;
        let peer: [u8; 4] =
            unsafe { bpf_probe_read_kernel(field(sock, offsets.sk_daddr).cast()) }.ok()?;
        connection.local.addr[..4].copy_from_slice(&local);
        connection.peer.addr[..4].copy_from_slice(&peer);
    } else if family == AF_INET6 {
        connection.local.addr =
            unsafe { bpf_probe_read_kernel(field(sock, offsets.sk_v6_rcv_saddr).cast()) }.ok()?;
        connection.peer.addr =
            unsafe { bpf_probe_read_kernel(field(sock, offsets.sk_v6_daddr).cast()) }.ok()?;
    } else {
        return None;
    }
    Some(())
}
