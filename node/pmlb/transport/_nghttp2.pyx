# cython: language_level=3, boundscheck=False, wraparound=False
"""One gRPC client stream over libnghttp2: the byte work of the ``nghttp2``
link transport (``pmlb.transport.ngh2`` is the asyncio side).

Everything per byte happens here, in C: HTTP/2 framing and parsing
(libnghttp2, the library behind curl, Apache httpd and Node.js), gRPC's
5-byte message prefixes, and the copies between them. No HTTP/2 is
implemented here: this file binds the library and keeps a gRPC stream's
state; what crosses into Python is whole messages and bytes to write.

Bounds: what arrives is held until Python takes it, and the stream's HTTP/2
window is only given back (``nghttp2_session_consume``) when it does, so a
peer can never make this hold more than the window it was granted. A message
declared over ``max_message`` is dropped as it arrives, never held. What is
queued to send is bounded by the caller (``queued``).
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.object cimport PyObject_Length
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int32_t, uint8_t, uint32_t
from libc.string cimport memcpy

from collections import deque


cdef extern from "nghttp2/nghttp2.h":
    ctypedef struct nghttp2_session:
        pass
    ctypedef struct nghttp2_session_callbacks:
        pass
    ctypedef struct nghttp2_option:
        pass
    ctypedef struct nghttp2_frame_hd:
        size_t length
        int32_t stream_id
        uint8_t type
        uint8_t flags
    ctypedef struct nghttp2_headers:
        nghttp2_frame_hd hd
        int cat
    ctypedef struct nghttp2_goaway:
        nghttp2_frame_hd hd
        int32_t last_stream_id
        uint32_t error_code
    ctypedef union nghttp2_frame:
        nghttp2_frame_hd hd
        nghttp2_headers headers
        nghttp2_goaway goaway
    ctypedef struct nghttp2_nv:
        uint8_t *name
        uint8_t *value
        size_t namelen
        size_t valuelen
        uint8_t flags
    ctypedef struct nghttp2_settings_entry:
        int32_t settings_id
        uint32_t value
    ctypedef union nghttp2_data_source:
        int fd
        void *ptr
    ctypedef ssize_t (*nghttp2_data_source_read_callback)(
        nghttp2_session *, int32_t, uint8_t *, size_t, uint32_t *, nghttp2_data_source *, void *
    ) noexcept
    ctypedef struct nghttp2_data_provider:
        nghttp2_data_source source
        nghttp2_data_source_read_callback read_callback
    ctypedef struct nghttp2_priority_spec:
        pass

    ctypedef int (*on_frame_recv_cb)(nghttp2_session *, const nghttp2_frame *, void *) noexcept
    ctypedef int (*on_data_chunk_recv_cb)(
        nghttp2_session *, uint8_t, int32_t, const uint8_t *, size_t, void *
    ) noexcept
    ctypedef int (*on_stream_close_cb)(nghttp2_session *, int32_t, uint32_t, void *) noexcept
    ctypedef int (*on_header_cb)(
        nghttp2_session *, const nghttp2_frame *, const uint8_t *, size_t, const uint8_t *,
        size_t, uint8_t, void *
    ) noexcept
    ctypedef int (*send_data_cb)(
        nghttp2_session *, nghttp2_frame *, const uint8_t *, size_t, nghttp2_data_source *, void *
    ) noexcept
    ctypedef ssize_t (*read_length_cb)(
        nghttp2_session *, uint8_t, int32_t, int32_t, int32_t, uint32_t, void *
    ) noexcept

    int nghttp2_session_callbacks_new(nghttp2_session_callbacks **)
    void nghttp2_session_callbacks_del(nghttp2_session_callbacks *)
    void nghttp2_session_callbacks_set_on_frame_recv_callback(nghttp2_session_callbacks *, on_frame_recv_cb)
    void nghttp2_session_callbacks_set_on_data_chunk_recv_callback(nghttp2_session_callbacks *, on_data_chunk_recv_cb)
    void nghttp2_session_callbacks_set_on_stream_close_callback(nghttp2_session_callbacks *, on_stream_close_cb)
    void nghttp2_session_callbacks_set_on_header_callback(nghttp2_session_callbacks *, on_header_cb)
    void nghttp2_session_callbacks_set_on_frame_send_callback(nghttp2_session_callbacks *, on_frame_recv_cb)
    void nghttp2_session_callbacks_set_data_source_read_length_callback(nghttp2_session_callbacks *, read_length_cb)
    void nghttp2_session_callbacks_set_send_data_callback(nghttp2_session_callbacks *, send_data_cb)

    int nghttp2_option_new(nghttp2_option **)
    void nghttp2_option_del(nghttp2_option *)
    void nghttp2_option_set_no_auto_window_update(nghttp2_option *, int)

    int nghttp2_session_client_new2(nghttp2_session **, const nghttp2_session_callbacks *, void *, const nghttp2_option *)
    void nghttp2_session_del(nghttp2_session *)
    ssize_t nghttp2_session_mem_recv(nghttp2_session *, const uint8_t *, size_t)
    ssize_t nghttp2_session_mem_send(nghttp2_session *, const uint8_t **)
    int nghttp2_submit_settings(nghttp2_session *, uint8_t, const nghttp2_settings_entry *, size_t)
    int32_t nghttp2_submit_request(nghttp2_session *, const nghttp2_priority_spec *, const nghttp2_nv *, size_t, const nghttp2_data_provider *, void *)
    int nghttp2_session_resume_data(nghttp2_session *, int32_t)
    int nghttp2_submit_rst_stream(nghttp2_session *, uint8_t, int32_t, uint32_t)
    int nghttp2_submit_ping(nghttp2_session *, uint8_t, const uint8_t *)
    int nghttp2_session_consume(nghttp2_session *, int32_t, size_t)
    int nghttp2_session_set_local_window_size(nghttp2_session *, uint8_t, int32_t, int32_t)
    int nghttp2_session_terminate_session(nghttp2_session *, uint32_t)
    int nghttp2_session_want_read(nghttp2_session *)
    int nghttp2_session_want_write(nghttp2_session *)
    ctypedef struct nghttp2_info:
        const char *version_str
    nghttp2_info *nghttp2_version(int)
    const char *nghttp2_strerror(int)
    const char *nghttp2_http2_strerror(uint32_t)

    enum:
        NGHTTP2_DATA
        NGHTTP2_HEADERS
        NGHTTP2_RST_STREAM
        NGHTTP2_PING
        NGHTTP2_GOAWAY
        NGHTTP2_FLAG_NONE
        NGHTTP2_FLAG_END_STREAM
        NGHTTP2_FLAG_ACK
        NGHTTP2_HCAT_RESPONSE
        NGHTTP2_HCAT_HEADERS
        NGHTTP2_NV_FLAG_NONE
        NGHTTP2_DATA_FLAG_EOF
        NGHTTP2_DATA_FLAG_NO_COPY
        NGHTTP2_ERR_DEFERRED
        NGHTTP2_ERR_CALLBACK_FAILURE
        NGHTTP2_SETTINGS_ENABLE_PUSH
        NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE
        NGHTTP2_SETTINGS_MAX_FRAME_SIZE
        NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE
        NGHTTP2_CANCEL
        NGHTTP2_NO_ERROR
        NGHTTP2_INTERNAL_ERROR


class H2Error(Exception):
    """libnghttp2 refused what the peer sent or what was asked of it."""


def library_version() -> str:
    """The version of the libnghttp2 this module runs on."""
    return nghttp2_version(0).version_str.decode()


# DATA frames at least this long are written from the queued messages
# themselves (the frame header, then views of the messages: one writev, no
# copy); shorter ones are copied into one buffer, cheaper for small frames.
NO_COPY_MIN = 8192


# Whole received messages held for Python to take, at most (see _cut_from).
MAX_PENDING = 1024


# Headers and trailers the peer may send, in bytes of names and values; more
# fails the stream (SETTINGS_MAX_HEADER_LIST_SIZE says so to the peer too).
MAX_HEADER_BYTES = 65536


cdef class ClientStream:
    """One HTTP/2 connection carrying one gRPC bidirectional stream.

    The caller feeds it what the socket read (``receive``), writes what it
    returns (``output``), queues messages (``send``) and takes whole received
    messages (``take``), giving their bytes back to the window (``consume``).
    """

    cdef nghttp2_session *session
    cdef readonly int32_t stream_id
    cdef readonly object headers      # response headers: {name: value} (str)
    cdef readonly object trailers     # trailers, or None before them
    cdef readonly bint ended          # the peer ended its side (END_STREAM)
    cdef readonly bint closed         # the stream is closed (either way)
    cdef readonly uint32_t reset_code # RST_STREAM / GOAWAY code when closed by one
    cdef readonly int pings_acked
    cdef readonly long long queued    # bytes handed to send() not yet framed
    cdef readonly bint goaway         # the peer sent GOAWAY
    cdef readonly uint32_t local_error  # we sent GOAWAY with this error: the peer broke HTTP/2
    cdef object _out                  # deque of bytes to frame
    cdef list _parts                  # what output() returns: bytes and views, in order
    cdef Py_ssize_t _out_off
    cdef bint _eof                    # done writing: END_STREAM after _out
    cdef bint _deferred
    cdef object _current              # headers or trailers being received
    cdef long long _header_bytes
    # Received DATA not yet cut into messages.
    cdef bytearray _rbuf
    cdef Py_ssize_t _rstart
    cdef object _messages             # deque of (bytes or None, wire size)
    cdef long long _skip              # bytes of an oversized message still to drop
    cdef long long _given             # bytes of the message arriving already given back
    cdef long long _max_message
    cdef readonly long long dropped   # oversized messages dropped
    cdef readonly bint compressed     # a compressed message arrived (refused)
    cdef object _error                # an exception raised inside a callback

    def __cinit__(self):
        self.session = NULL

    def __init__(self, list headers, int window, int max_frame, long long max_message):
        cdef nghttp2_session_callbacks *cbs
        cdef nghttp2_option *opt
        cdef nghttp2_settings_entry iv[4]
        cdef nghttp2_data_provider prd
        self.headers = {}
        self.trailers = None
        self._out = deque()
        self._parts = []
        self._rbuf = bytearray()
        self._messages = deque()
        self._max_message = max_message
        if nghttp2_session_callbacks_new(&cbs) != 0:
            raise MemoryError()
        nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, _on_frame_recv)
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, _on_data_chunk)
        nghttp2_session_callbacks_set_on_stream_close_callback(cbs, _on_stream_close)
        nghttp2_session_callbacks_set_on_header_callback(cbs, _on_header)
        nghttp2_session_callbacks_set_on_frame_send_callback(cbs, _on_frame_send)
        nghttp2_session_callbacks_set_data_source_read_length_callback(cbs, _read_length)
        nghttp2_session_callbacks_set_send_data_callback(cbs, _send_data)
        if nghttp2_option_new(&opt) != 0:
            nghttp2_session_callbacks_del(cbs)
            raise MemoryError()
        # The window is given back as Python takes messages, not as bytes
        # arrive: what is held here is bounded by the window.
        nghttp2_option_set_no_auto_window_update(opt, 1)
        rv = nghttp2_session_client_new2(&self.session, cbs, <void *>self, opt)
        nghttp2_option_del(opt)
        nghttp2_session_callbacks_del(cbs)
        if rv != 0:
            raise MemoryError()
        iv[0].settings_id = NGHTTP2_SETTINGS_ENABLE_PUSH
        iv[0].value = 0
        iv[1].settings_id = NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE
        iv[1].value = window
        iv[2].settings_id = NGHTTP2_SETTINGS_MAX_FRAME_SIZE
        iv[2].value = max_frame
        iv[3].settings_id = NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE
        iv[3].value = MAX_HEADER_BYTES
        _check(nghttp2_submit_settings(self.session, NGHTTP2_FLAG_NONE, iv, 4))
        _check(nghttp2_session_set_local_window_size(self.session, NGHTTP2_FLAG_NONE, 0, window))
        # The request: names and values must stay alive until submitted
        # (nghttp2 copies them in nghttp2_submit_request).
        cdef Py_ssize_t n = len(headers)
        nva = bytearray(n * sizeof(nghttp2_nv))
        cdef nghttp2_nv *nv = <nghttp2_nv *><char *>nva
        for i, (name, value) in enumerate(headers):
            nv[i].name = <uint8_t *>PyBytes_AS_STRING(name)
            nv[i].namelen = PyBytes_GET_SIZE(name)
            nv[i].value = <uint8_t *>PyBytes_AS_STRING(value)
            nv[i].valuelen = PyBytes_GET_SIZE(value)
            nv[i].flags = NGHTTP2_NV_FLAG_NONE
        prd.source.ptr = NULL
        prd.read_callback = _read_data
        sid = nghttp2_submit_request(self.session, NULL, nv, n, &prd, NULL)
        if sid < 0:
            _check(sid)
        self.stream_id = sid

    def __dealloc__(self):
        if self.session != NULL:
            nghttp2_session_del(self.session)
            self.session = NULL

    # -- input ---------------------------------------------------------------

    def receive(self, data) -> None:
        """Feed bytes read from the connection. A peer that breaks HTTP/2 is
        answered with a GOAWAY, in ``output()``, which then sets
        ``local_error``: the connection is to be closed once it is written.
        H2Error is for what libnghttp2 cannot go on from (out of memory)."""
        cdef const uint8_t[:] view = data
        cdef Py_ssize_t n = view.shape[0]
        if n == 0:
            return
        rv = nghttp2_session_mem_recv(self.session, &view[0], n)
        err, self._error = self._error, None
        if err is not None:
            raise err
        if rv < 0:
            raise H2Error(nghttp2_strerror(<int>rv).decode())

    cdef int _chunk(self, const uint8_t *data, size_t n) except -1:
        """DATA for our stream: whole messages go out as they complete. A
        message that lies within one chunk is copied once, straight from
        libnghttp2's buffer; only a message split across chunks is gathered
        in _rbuf first."""
        cdef size_t take
        cdef Py_ssize_t old, used
        if self._skip:
            take = n if <long long>n < self._skip else <size_t>self._skip
            self._skip -= take
            # Dropped bytes go straight back to the window.
            nghttp2_session_consume(self.session, self.stream_id, take)
            data += take
            n -= take
            if n == 0:
                return 0
        buf = self._rbuf
        if PyByteArray_GET_SIZE(buf) == self._rstart:
            used = self._cut_from(data, n)
            if <size_t>used < n:
                if self._rstart:
                    del buf[:]
                    self._rstart = 0
                PyByteArray_Resize(buf, n - used)
                memcpy(PyByteArray_AS_STRING(buf), data + used, n - used)
            return 0
        old = PyByteArray_GET_SIZE(buf)
        PyByteArray_Resize(buf, old + <Py_ssize_t>n)
        memcpy(PyByteArray_AS_STRING(buf) + old, data, n)
        self._cut_buffered()
        return 0

    cdef int _cut_buffered(self) except -1:
        """Whole messages out of _rbuf (gathered, or held back by the cap)."""
        buf = self._rbuf
        used = self._cut_from(
            <const uint8_t *>PyByteArray_AS_STRING(buf) + self._rstart,
            PyByteArray_GET_SIZE(buf) - self._rstart,
        )
        self._rstart += used
        if self._rstart == PyByteArray_GET_SIZE(buf):
            del buf[:]
            self._rstart = 0
        elif self._rstart > 65536 and self._rstart * 2 > PyByteArray_GET_SIZE(buf):
            del buf[:self._rstart]
            self._rstart = 0
        return 0

    cdef Py_ssize_t _cut_from(self, const uint8_t *p, Py_ssize_t n) except -1:
        """Whole messages out of p[:n], which starts at a message; returns
        the bytes used (the rest begins a message still arriving). An
        oversized message starts skip mode.

        Window accounting: a whole message's bytes go back to the peer when
        Python takes it (``consume``), so untaken messages are bounded by
        the window; the bytes of the one message still arriving go back as
        they arrive, or a message larger than the window could never
        complete. What is held is at most the window plus one message.

        At most MAX_PENDING messages wait to be taken: past that the rest
        stays in _rbuf as bytes, its window not given back, and take() cuts
        it as room is made. A peer's window of empty messages is then bytes,
        not a million Python objects."""
        cdef Py_ssize_t start = 0
        cdef const uint8_t *q
        cdef long long size, have
        while n - start >= 5:
            if PyObject_Length(self._messages) >= MAX_PENDING:
                return start
            q = p + start
            size = (<long long>q[1] << 24) | (q[2] << 16) | (q[3] << 8) | q[4]
            if q[0]:
                self.compressed = True
            if size > self._max_message:
                self.dropped += 1
                self._messages.append((None, 0))
                have = n - start - 5
                if have >= size:
                    nghttp2_session_consume(self.session, self.stream_id, 5 + size - self._given)
                    self._given = 0
                    start += 5 + size
                    continue
                nghttp2_session_consume(self.session, self.stream_id, n - start - self._given)
                self._given = 0
                self._skip = size - have
                return n
            if n - start - 5 < size:
                break
            self._messages.append(
                (PyBytes_FromStringAndSize(<const char *>q + 5, size), 5 + size - self._given)
            )
            self._given = 0
            start += 5 + size
        if n - start > self._given:
            nghttp2_session_consume(self.session, self.stream_id, n - start - self._given)
            self._given = n - start
        return start

    def take(self):
        """The next whole message as (bytes, n), or (None, n) for one dropped
        as oversized, or None when none is complete; ``consume(n)`` once it
        is read gives its bytes back to the peer's window."""
        if not self._messages:
            return None
        taken = self._messages.popleft()
        if PyByteArray_GET_SIZE(self._rbuf) > self._rstart and not self._skip:
            self._cut_buffered()  # what the cap held back
        return taken

    def pending(self) -> int:
        """Whole messages waiting to be taken (at most MAX_PENDING)."""
        return len(self._messages)

    def consume(self, Py_ssize_t n) -> None:
        """Give ``n`` bytes of taken messages back to the peer's window."""
        if n > 0 and not self.closed:
            nghttp2_session_consume(self.session, self.stream_id, n)

    def partial(self) -> bool:
        """Part of a message is held (the stream ending now would cut it)."""
        return len(self._rbuf) > self._rstart or self._skip > 0

    # -- output --------------------------------------------------------------

    def send(self, bytes message) -> None:
        """Queue one gRPC message (uncompressed)."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(message)
        self._out.append(bytes((0, (n >> 24) & 255, (n >> 16) & 255, (n >> 8) & 255, n & 255)))
        self._out.append(message)
        self.queued += n + 5
        self._resume()

    def end(self) -> None:
        """Half-close after what is queued."""
        self._eof = True
        self._resume()

    cdef void _resume(self):
        if self._deferred and not self.closed:
            self._deferred = False
            nghttp2_session_resume_data(self.session, self.stream_id)

    cdef ssize_t _read(self, uint8_t *buf, size_t length, uint32_t *flags):
        cdef size_t done = 0, take
        cdef bytes head
        cdef Py_ssize_t size
        if <long long>length > self.queued:
            length = <size_t>self.queued
        if length >= NO_COPY_MIN:
            # _send_data takes these bytes off the queue, in this same call
            # of nghttp2_session_mem_send.
            flags[0] |= NGHTTP2_DATA_FLAG_NO_COPY
            self.queued -= length
            if self.queued == 0 and self._eof:
                flags[0] |= NGHTTP2_DATA_FLAG_EOF
            return length
        while done < length:
            head = self._out[0]
            size = PyBytes_GET_SIZE(head) - self._out_off
            take = length - done if <size_t>size > length - done else <size_t>size
            memcpy(buf + done, PyBytes_AS_STRING(head) + self._out_off, take)
            done += take
            if take == <size_t>size:
                self._out.popleft()
                self._out_off = 0
            else:
                self._out_off += take
        self.queued -= done
        if self.queued == 0 and self._eof:
            flags[0] |= NGHTTP2_DATA_FLAG_EOF
            return done
        if done == 0:
            self._deferred = True
            return NGHTTP2_ERR_DEFERRED
        return done

    cdef int _send(self, const uint8_t *framehd, size_t length) except -1:
        """A NO_COPY DATA frame: its header, then ``length`` queued bytes as
        views (whole messages as they are)."""
        cdef bytes head
        cdef Py_ssize_t size, take
        parts = self._parts
        parts.append(PyBytes_FromStringAndSize(<const char *>framehd, 9))
        while length:
            head = self._out[0]
            size = PyBytes_GET_SIZE(head) - self._out_off
            take = <Py_ssize_t>length if size > <Py_ssize_t>length else size
            if self._out_off == 0 and take == size:
                parts.append(head)
            else:
                parts.append(memoryview(head)[self._out_off:self._out_off + take])
            length -= take
            if take == size:
                self._out.popleft()
                self._out_off = 0
            else:
                self._out_off += take
        return 0

    def output(self):
        """What to write to the connection now, in order: a list of bytes
        and memoryviews (empty for nothing); the views stay valid as long
        as the list is held."""
        cdef const uint8_t *data
        cdef ssize_t n
        parts = self._parts
        while True:
            n = nghttp2_session_mem_send(self.session, &data)
            if n < 0:
                self._parts = []
                raise H2Error(nghttp2_strerror(<int>n).decode())
            if n == 0:
                break
            parts.append(PyBytes_FromStringAndSize(<const char *>data, n))
        self._parts = []
        err, self._error = self._error, None
        if err is not None:
            raise err
        return parts

    def ping(self) -> None:
        _check(nghttp2_submit_ping(self.session, NGHTTP2_FLAG_NONE, NULL))

    def cancel(self) -> None:
        """RST_STREAM(CANCEL), then GOAWAY: this connection is done."""
        if not self.closed:
            nghttp2_submit_rst_stream(self.session, NGHTTP2_FLAG_NONE, self.stream_id, NGHTTP2_CANCEL)
        nghttp2_session_terminate_session(self.session, NGHTTP2_NO_ERROR)

    def alive(self) -> bool:
        """The session still wants to read or write (no GOAWAY exchanged)."""
        return bool(nghttp2_session_want_read(self.session) or nghttp2_session_want_write(self.session))

    @staticmethod
    def describe_code(uint32_t code) -> str:
        return nghttp2_http2_strerror(code).decode()


cdef int _check(int rv) except -1:
    if rv < 0:
        raise H2Error(nghttp2_strerror(rv).decode())
    return 0


cdef int _on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame, void *user) noexcept:
    cdef ClientStream self = <ClientStream>user
    cdef uint8_t t = frame.hd.type
    try:
        if t == NGHTTP2_PING and frame.hd.flags & NGHTTP2_FLAG_ACK:
            self.pings_acked += 1
        elif t == NGHTTP2_GOAWAY:
            self.goaway = True
            if frame.goaway.error_code and not self.reset_code:
                self.reset_code = frame.goaway.error_code
        elif frame.hd.stream_id == self.stream_id and t in (NGHTTP2_DATA, NGHTTP2_HEADERS):
            if t == NGHTTP2_HEADERS:
                self._current = None
            if frame.hd.flags & NGHTTP2_FLAG_END_STREAM:
                self.ended = True
    except BaseException as exc:
        self._error = exc
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef int _on_frame_send(nghttp2_session *session, const nghttp2_frame *frame, void *user) noexcept:
    cdef ClientStream self = <ClientStream>user
    if frame.hd.type == NGHTTP2_GOAWAY and frame.goaway.error_code and not self.local_error:
        self.local_error = frame.goaway.error_code
    return 0


cdef int _on_data_chunk(
    nghttp2_session *session, uint8_t flags, int32_t stream_id, const uint8_t *data, size_t n,
    void *user
) noexcept:
    cdef ClientStream self = <ClientStream>user
    if stream_id != self.stream_id:
        return 0
    try:
        self._chunk(data, n)
    except BaseException as exc:
        self._error = exc
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef int _on_stream_close(nghttp2_session *session, int32_t stream_id, uint32_t code, void *user) noexcept:
    cdef ClientStream self = <ClientStream>user
    if stream_id == self.stream_id:
        self.closed = True
        if code and not self.reset_code:
            self.reset_code = code
    return 0


cdef int _on_header(
    nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name, size_t namelen,
    const uint8_t *value, size_t valuelen, uint8_t flags, void *user
) noexcept:
    cdef ClientStream self = <ClientStream>user
    if frame.hd.stream_id != self.stream_id:
        return 0
    try:
        self._header_bytes += namelen + valuelen
        if self._header_bytes > 2 * MAX_HEADER_BYTES:
            raise H2Error("the peer's headers and trailers are over the limit")
        if self._current is None:
            if frame.headers.cat == NGHTTP2_HCAT_RESPONSE:
                self._current = self.headers
            else:
                self.trailers = {}
                self._current = self.trailers
        k = (<const char *>name)[:namelen].decode("latin-1")
        self._current[k] = (<const char *>value)[:valuelen].decode("utf-8", "replace")
    except BaseException as exc:
        self._error = exc
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef ssize_t _read_data(
    nghttp2_session *session, int32_t stream_id, uint8_t *buf, size_t length, uint32_t *flags,
    nghttp2_data_source *source, void *user
) noexcept:
    cdef ClientStream self = <ClientStream>user
    return self._read(buf, length, flags)


cdef int _send_data(
    nghttp2_session *session, nghttp2_frame *frame, const uint8_t *framehd, size_t length,
    nghttp2_data_source *source, void *user
) noexcept:
    cdef ClientStream self = <ClientStream>user
    try:
        self._send(framehd, length)
    except BaseException as exc:
        self._error = exc
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef ssize_t _read_length(
    nghttp2_session *session, uint8_t frame_type, int32_t stream_id, int32_t session_window,
    int32_t stream_window, uint32_t max_frame, void *user
) noexcept:
    # As large as the peer takes and the windows allow: one large frame costs
    # one header and one callback instead of many 16 KiB ones.
    cdef ssize_t n = max_frame
    if session_window < n:
        n = session_window
    if stream_window < n:
        n = stream_window
    return n if n > 0 else 1
