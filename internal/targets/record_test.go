package targets

import (
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// testRecord is a well-formed READY record of key at target (as a verified fill writes it).
func testRecord(key, target, uid, bucket string, size uint64, created time.Time, ttl time.Duration) *pb.StoredObject {
	o := &pb.StoredObject{Key: key, Target: target, State: pb.ObjectState_OBJECT_STATE_READY, Size: size,
		MediaType: "application/mercurial-cbor", Sha256: make([]byte, 32), Sha1: make([]byte, 20), Created: timestamppb.New(created),
		ObjectName: "objects/" + key, Bucket: bucket, TargetUid: uid, Generation: 1}
	if ttl > 0 {
		o.Expires = timestamppb.New(created.Add(ttl))
	}
	return o
}
