"""The shell's process control: workdir locks, supervision of multi-host runs, the fork
server that starts sweep trials."""
