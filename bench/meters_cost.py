"""Per-message cost of the meters on the mail path (worst case: one message per session, one batch per message)."""
import timeit
from relaywatch import meters

replies = ["220 relay.test ESMTP", "250-relay.test\r\n250-PIPELINING\r\n250 8BITMIME", "250 2.1.0 OK",
           "250 2.1.5 OK", "354 End data with <CR><LF>.<CR><LF>", "250 2.0.0 queued as X", "221 2.0.0 Bye"]

def per_message():
    meters.session_opened("smtp")
    for reply in replies:            # receive/session.py _flush: one check per reply
        if reply.startswith(("4", "5")):
            meters.refused(reply)
    meters.commit_seconds.observe(0.0021)   # store/batch.py: one batch (worst case: one message a batch)
    meters.observe_attempt("partner", 0.083)  # deliver/scheduler.py _finish
    meters.session_closed("smtp")

def empty():
    for reply in replies:
        pass

n = 200_000
for _ in range(3):
    t = min(timeit.repeat(per_message, number=n, repeat=5)) / n
    base = min(timeit.repeat(empty, number=n, repeat=5)) / n
    print(f"meters per message: {(t - base) * 1e6:.3f} us (loop over replies alone {base * 1e6:.3f} us)")
rej = min(timeit.repeat(lambda: meters.refused("550 5.7.1 Relaying denied"), number=n, repeat=5)) / n
print(f"one refused reply counted: {rej * 1e6:.3f} us")
