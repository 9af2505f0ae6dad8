package blob

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"cloud.google.com/go/storage"
)

// Bucket change notifications (https://cloud.google.com/storage/docs/pubsub-notifications): GCS
// publishes a Pub/Sub message for every change of an object under a prefix, which is how the
// control plane learns within seconds that bytes a record names were replaced or deleted.

// Event types of bucket notifications.
const (
	EventFinalize = storage.ObjectFinalizeEvent       // an object (generation) was written
	EventDelete   = storage.ObjectDeleteEvent         // a generation was deleted, or replaced by a newer one
	EventArchive  = storage.ObjectArchiveEvent        // a generation became noncurrent (versioned buckets)
	EventMetadata = storage.ObjectMetadataUpdateEvent // an object's metadata changed
)

// Event is one bucket notification, from its message's attributes (the payload is not needed).
type Event struct {
	Type       string
	Bucket     string
	Name       string
	Generation int64
	// OverwrittenBy is the generation written over this one (OBJECT_DELETE and OBJECT_ARCHIVE of a
	// replaced generation); 0: not a replacement, or not said.
	OverwrittenBy int64
}

// ParseEvent reads a notification from a Pub/Sub message's attributes; false if they are not one.
func ParseEvent(attrs map[string]string) (Event, bool) {
	e := Event{Type: attrs["eventType"], Bucket: attrs["bucketId"], Name: attrs["objectId"]}
	g, err := strconv.ParseInt(attrs["objectGeneration"], 10, 64)
	if e.Type == "" || e.Bucket == "" || e.Name == "" || err != nil {
		return Event{}, false
	}
	e.Generation = g
	if by, err := strconv.ParseInt(attrs["overwrittenByGeneration"], 10, 64); err == nil {
		e.OverwrittenBy = by
	}
	return e, true
}

// SplitTopic splits a topic's full name, projects/P/topics/T, into its project and topic IDs.
func SplitTopic(topic string) (project, id string, err error) {
	parts := strings.Split(strings.TrimPrefix(topic, "//pubsub.googleapis.com/"), "/")
	if len(parts) != 4 || parts[0] != "projects" || parts[2] != "topics" || parts[1] == "" || parts[3] == "" {
		return "", "", fmt.Errorf("topic %q is not projects/<project>/topics/<topic>", topic)
	}
	return parts[1], parts[3], nil
}

// EnsureNotification makes bucket publish every change of objects under prefix to topic
// (projects/P/topics/T), without payload, unless a notification of the bucket to that topic already
// covers the prefix for every event type. It says whether it made one. On GCS the bucket's service
// agent needs the Pub/Sub Publisher role on the topic.
func (s *Store) EnsureNotification(ctx context.Context, bucket, prefix, topic string) (bool, error) {
	project, id, err := SplitTopic(topic)
	if err != nil {
		return false, err
	}
	b := s.client.Bucket(bucket)
	existing, err := b.Notifications(ctx)
	if errors.Is(err, storage.ErrBucketNotExist) {
		return false, fmt.Errorf("notifications of %s: %w", bucket, ErrNotFound)
	}
	if err != nil {
		return false, fmt.Errorf("notifications of %s: %w", bucket, err)
	}
	for _, n := range existing {
		if n.TopicProjectID == project && n.TopicID == id && strings.HasPrefix(prefix, n.ObjectNamePrefix) && covers(n.EventTypes) {
			return false, nil
		}
	}
	if _, err := b.AddNotification(ctx, &storage.Notification{TopicProjectID: project, TopicID: id,
		PayloadFormat: storage.NoPayload, ObjectNamePrefix: prefix}); err != nil {
		return false, fmt.Errorf("add a notification of %s/%s to %s: %w", bucket, prefix, topic, err)
	}
	return true, nil
}

// covers says whether a notification's event types include every one Detour acts on.
func covers(types []string) bool {
	if len(types) == 0 {
		return true
	}
	need := map[string]bool{EventFinalize: true, EventDelete: true, EventArchive: true, EventMetadata: true}
	for _, t := range types {
		delete(need, t)
	}
	return len(need) == 0
}
