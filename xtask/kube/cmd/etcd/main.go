// etcd at the version kube-apiserver is built and tested with (Debian's 3.4 is older than it
// supports).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
