"""The running process and this machine: the numeric precision chosen per machine (``precision``), the heap
allocator (``allocator``) and the user's cache folder that keeps per-machine decisions and downloads (``cache``)."""
