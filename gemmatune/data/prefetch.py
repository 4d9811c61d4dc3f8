"""Collate the next micro-batches on a background thread while the GPU trains the current ones.

Why: turning rows into tensors happens on the CPU, and for images and audio it is real work
(resizing and patching an image, a clip's mel features: tens of milliseconds each), about as
long as the GPU needs to train the micro-batch. Done in line, the GPU waits for it every step.
Here one thread produces the micro-batches in order, up to `depth` ahead: the same items in
the same order as without it, so training and resuming are unchanged. Decoding and numpy
release the GIL; the thread never touches the GPU.
"""
import queue
import threading

_END = object()


def prefetched(items, depth: int):
    """Yield what the iterator `items` yields, in its order, produced up to `depth` items ahead
    on a daemon thread. An error in `items` is raised here, at the item where it happened;
    closing (or dropping) this generator stops the thread."""
    ready: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as error:  # handed to the consumer, raised there
            put((None, error))

    thread = threading.Thread(target=produce, name="gemmatune-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        stop.set()
