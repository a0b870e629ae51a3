"""What attention costs, as closed forms: arithmetic (flops) and memory traffic (io_complexity)."""
