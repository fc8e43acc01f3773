r2€€€€
/images/a.qcow2*br0B/images/seed.iso