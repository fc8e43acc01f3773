r”€€€€$
/var/lib/images/debian.qcow2€€€€Pdefault/data"default2=#cloud-config
runcmd:
  - [sh, -c, 'echo hi > /dev/console']
:0000:3b:00.0j	
vmyes