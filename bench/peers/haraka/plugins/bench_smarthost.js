// bench/run.py: every outbound message goes to the benchmark's sink.
// Haraka's outbound queue (queue/ under the instance directory) still holds
// it durably first; this only replaces the MX lookup.
exports.hook_get_mx = function (next, hmail, domain) {
    next(OK, { exchange: '127.0.0.1', port: {{SINK_PORT}}, priority: 0 })
}
