//! Run history through the CLI: runs list/show/logs, runs started and fed from outside,
//! abandoned runs, and two processes writing at once.
