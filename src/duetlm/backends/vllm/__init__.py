"""vLLM: the offline engine (`offline`), the async engine of `duet serve` (`async_engine`), and
the platform defaults and start-up checks both share (`start`)."""
