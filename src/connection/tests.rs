//! Connection state-machine tests (filled below).
